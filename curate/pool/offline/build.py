"""`curate pool build-offline`: a real, noisy image-text pool built from offline sources.

Steps: read the sources -> hold out the evaluation splits -> render/copy the pool images into www/
(SVGs rendered by cairosvg in a process pool, with a per-file time/size limit and a render cache)
-> inject seeded noise -> write urls.parquet, truth.parquet, evalsets/ and pool_build.json.

`--size large` / `large-mini` (build_large below) read eight sources instead of three: the same
three plus iconify icons, OpenMoji, Fluent and Noto emoji, and Freeciv flags with their legends
(curate/pool/offline/large.py), tag web-crawl noise (logos, UI glyphs, cross-source copies,
boilerplate) before the seeded kinds, hold out suite v2 by concept key (evalsplits.split_v2), and
also write trusted.parquet and ATTRIBUTION.json/.md; truth.parquet gains package, package_version,
license, collection and concept columns. `small` and `full` are unchanged, byte for byte.

Everything is built in a temporary sibling folder and renamed into place at the end, so DIR is
either the complete previous pool or the complete new one. The same seed gives byte-identical
files (pool_build.json differs only in its "timings" and "render" run statistics).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from curate.core.parallel import Backend, pmap
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from curate.core.version import __version__
from curate.core.atomic import write_json, write_parquet
from curate.core.errors import CurateError, MissingDependencyError
from curate.pool.offline.evalsplits import TASKS, V2_TASKS, HoldoutConfig, split_heldout, split_v2
from curate.pool.offline.large import (
    FREECIV_DIR, TRUSTED_SOURCES, LargeSpec, read_freeciv, read_large_sources, tag_web_noise, web_kind,
)
from curate.pool.offline.noise import NoiseConfig, Row, file_id, inject
from curate.pool.offline.packages import check_allowed, debian_package, needs_attribution
from curate.pool.offline.sources import (
    RenderJob,
    SourceItem,
    SourcePaths,
    read_openclipart,
    read_tuxpaint,
    read_twemoji,
    run_render_job,
)
from curate.core.uids import make_uid

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://127.0.0.1:8642"
FORMAT_VERSION = 1

# How many source items each size uses (None = all). `small` is for tests: ~1,500 rows.
SIZES = {
    "small": {"openclipart": 700, "tuxpaint": 200, "twemoji_groups": 330},
    "full": {"openclipart": None, "tuxpaint": None, "twemoji_groups": None},
}

# The large pool (>= 100k rows from 8 sources, suite v2) and its CI-sized twin, which reads only
# the packages `make setup` installs. See curate/pool/offline/large.py.
LARGE_SIZES = {
    "large": LargeSpec(iconify_full=True, iconify_per_set=500, openclipart=None, tuxpaint=None, emoji_groups=None,
                       noto=True, emoji_heldout=0.2, icon_heldout=700, tuxpaint_heldout=0.2, task_cap=2000),
    "large-mini": LargeSpec(iconify_full=False, iconify_per_set=100, openclipart=40, tuxpaint=60, emoji_groups=80,
                            noto=False, emoji_heldout=0.2, icon_heldout=12, tuxpaint_heldout=0.2, task_cap=40,
                            icon_min_sets=1, freeciv=40),
}
SIZE_CHOICES = sorted([*SIZES, *LARGE_SIZES])


@dataclass(frozen=True)
class RenderConfig:
    """How pool images are rendered. Sizes vary on purpose: a seeded fraction is below DataComp's
    200 px min-side rule so that a basic filter has something real to remove."""

    small_fraction: float = 0.15
    small_range: tuple[int, int] = (64, 190)
    large_range: tuple[int, int] = (256, 448)
    jpeg_fraction: float = 0.6
    emoji_native_fraction: float = 0.2
    emoji_sizes: tuple[int, ...] = (128, 256, 256, 320)
    eval_long_side: int = 256
    max_source_bytes: int = 2_000_000
    max_pixels: int = 4_000_000
    time_limit: float = 30.0          # CPU seconds per file; the slowest openclipart SVG takes ~13


@dataclass(frozen=True)
class LargeRenderConfig:
    """Render sizes of the large pool, per source: icons are legible at 64 px, and a 100k-row pool
    must render in minutes on 2 cores. Everything is flattened on white (glyphs are drawn on
    transparency, which an RGB decoder turns black)."""

    icon_side: int = 64
    emoji_sizes: tuple[int, ...] = (64, 96, 128)
    clipart_small_fraction: float = 0.15
    clipart_small_range: tuple[int, int] = (64, 150)
    clipart_large_range: tuple[int, int] = (200, 256)
    stamp_range: tuple[int, int] = (128, 256)
    jpeg_fraction: float = 0.5
    flag_sizes: tuple[int, ...] = (88, 132)
    eval_side: int = 128


# web-crawl-like rates for the large pool: the real kinds (logos, UI glyphs, copies) are already a
# large share of it, so the seeded ones are lower than the small pool's
LARGE_NOISE = NoiseConfig(caption_swap=0.08, non_english=0.30, empty_caption=0.01, redirect=0.005, exact_dup=0.03,
                          near_dup=0.03, http_404=0.01, truncated=0.005, not_image=0.005)


@dataclass(frozen=True)
class OfflinePoolConfig:
    out: Path
    seed: int = 0
    size: str = "full"
    base_url: str = DEFAULT_BASE_URL
    overwrite: bool = False
    workers: int = 2
    cache_dir: Path | None = None          # None: $CURATE_CACHE/render or ~/.cache/curate/render
    sources: SourcePaths = field(default_factory=SourcePaths)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    holdout: HoldoutConfig = field(default_factory=HoldoutConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    progress: bool = True
    # --size large / large-mini only (not part of the small/full fingerprint)
    large_noise: NoiseConfig = LARGE_NOISE
    large_render: LargeRenderConfig = field(default_factory=LargeRenderConfig)
    boilerplate: float = 0.02

    def fingerprint(self) -> str:
        """What determines the output bytes (not where it goes, not how fast)."""
        d = {
            "format": FORMAT_VERSION, "curate": __version__, "seed": self.seed, "size": self.size,
            "base_url": self.base_url.rstrip("/"), "noise": asdict(self.noise), "holdout": asdict(self.holdout),
            "render": asdict(self.render), "sources": {k: str(v) for k, v in asdict(self.sources.resolved()).items()},
        }
        if self.size in LARGE_SIZES:
            from curate.pool.offline.packages import PINS

            d.update(noise=asdict(self.large_noise), render=asdict(self.large_render), boilerplate=self.boilerplate,
                     holdout=asdict(LARGE_SIZES[self.size]), deps=str(_deps()),
                     pins={k: (v.version, v.tree_sha256) for k, v in sorted(PINS.items())})
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _deps() -> Path:
    from curate.pool.offline.sources import deps_dir

    return deps_dir()


def render_cache_dir(cfg: OfflinePoolConfig) -> Path:
    if cfg.cache_dir is not None:
        return Path(cfg.cache_dir)
    root = os.environ.get("CURATE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "curate") / "render"


def _check_base_url(url: str) -> str:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname or u.query or u.fragment:
        raise CurateError(f"--base-url {url!r}: expected http(s)://host[:port][/path]")
    return url.rstrip("/")


# ------------------------------------------------------------------ source selection

def _select_sources(cfg: OfflinePoolConfig) -> list[SourceItem]:
    limits = SIZES[cfg.size]
    paths = cfg.sources.resolved()
    emoji = read_twemoji(paths.twemoji)
    stamps = read_tuxpaint(paths.tuxpaint)
    clipart = read_openclipart(paths.openclipart, sample=limits["openclipart"], seed=cfg.seed)
    if limits["tuxpaint"] is not None and limits["tuxpaint"] < len(stamps):
        stamps = sorted(random.Random(f"{cfg.seed}:tuxpaint-sample").sample(stamps, limits["tuxpaint"]),
                        key=lambda s: s.source_id)
    if limits["twemoji_groups"] is not None:
        groups = sorted({e.group for e in emoji})
        keep = set(random.Random(f"{cfg.seed}:twemoji-sample").sample(groups, min(len(groups), limits["twemoji_groups"])))
        emoji = [e for e in emoji if e.group in keep]
    return clipart + stamps + emoji


# ------------------------------------------------------------------ images

@dataclass
class Planned:
    """One image to produce: an SVG render (cached) or a PNG copy/upscale."""

    item: SourceItem
    rel: str            # path under the output root (www/... or evalsets/...)
    long_side: int = 0  # 0: keep the source PNG bytes as they are
    fmt: str = "png"


def _plan_pool_image(item: SourceItem, seed: int, rc: RenderConfig) -> Planned:
    rng = random.Random(f"{seed}:render:{item.source}:{item.source_id}")
    fid = file_id(seed, item.source, item.source_id)
    if item.is_svg:
        lo, hi = rc.small_range if rng.random() < rc.small_fraction else rc.large_range
        fmt = "jpeg" if rng.random() < rc.jpeg_fraction else "png"
        ext = "jpg" if fmt == "jpeg" else "png"
        return Planned(item, f"www/{item.source}/{fid}.{ext}", rng.randint(lo, hi), fmt)
    if item.source == "twemoji" and rng.random() >= rc.emoji_native_fraction:
        return Planned(item, f"www/{item.source}/{fid}.png", rng.choice(rc.emoji_sizes), "png")
    return Planned(item, f"www/{item.source}/{fid}.png", 0, "png")


def _put(path: Path, data: bytes) -> None:
    """Plain write: files go into the private temp build folder, which is renamed into place whole,
    so per-file atomic renames and fsyncs (curate.core.atomic) would only cost time here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _cairosvg_version() -> str:
    import cairosvg

    return cairosvg.__version__


def _produce_images(plans: list[Planned], root: Path, cfg: OfflinePoolConfig) -> tuple[set[str], dict]:
    """Write every planned image under `root`; return (rels written, render stats).

    SVG renders and PNG resizes go through a content-addressed cache: key = sha256(source bytes +
    render parameters + cairosvg/Pillow versions), so a second build only copies files.
    """
    import PIL

    rc = cfg.render
    cache = render_cache_dir(cfg)
    cver = _cairosvg_version()
    jobs: list[tuple[Planned, RenderJob]] = []
    written: set[str] = set()
    skipped: list[dict] = []
    for p in plans:
        if p.item.is_svg or p.long_side:
            src = p.item.read_bytes()
            params = (f"|{p.long_side}|{p.fmt}|cairosvg {cver}|pillow {PIL.__version__}"
                      f"|limits {rc.max_source_bytes} {rc.max_pixels} {rc.time_limit}|v1")
            key = hashlib.sha256(src + params.encode()).hexdigest()
            cfile = cache / key[:2] / f"{key}.{p.fmt}"
            jobs.append((p, RenderJob(str(p.item.path), p.long_side, p.fmt, str(cfile), rc.max_source_bytes,
                                      rc.max_pixels, rc.time_limit, p.item.data)))
        else:  # served as the source published it
            _put(root / p.rel, p.item.path.read_bytes())
            written.add(p.rel)

    todo = [j for _, j in jobs if not (os.path.exists(j.cache_file) or os.path.exists(j.cache_file + ".fail"))]
    t0 = time.perf_counter()
    render_seconds: list[float] = []
    if todo:
        from tqdm import tqdm

        # Rendering is CPU-bound pure-Python+cairo work: processes, not threads. "spawn" because the
        # caller may have threads running (e.g. the test server) and signal-based limits need a main thread.
        chunk = 8 if len(todo) < 20_000 else 64  # the large pool's 64 px icons take ~1 ms each
        backend = Backend("process", max(1, cfg.workers), start_method="spawn")
        bar = tqdm(pmap(run_render_job, todo, backend=backend, chunksize=chunk, depth=4,
                        label=lambda j: f"render of {j.path}"),
                   total=len(todo), desc="render", unit="img", disable=not (cfg.progress and sys.stderr.isatty()))
        for _job, (_status, secs, _reason) in bar:
            render_seconds.append(secs)
    wall = time.perf_counter() - t0

    for p, j in jobs:
        if os.path.exists(j.cache_file):
            _put(root / p.rel, Path(j.cache_file).read_bytes())
            written.add(p.rel)
        else:
            try:
                reason = json.loads(Path(j.cache_file + ".fail").read_text())["reason"]
            except (OSError, ValueError, KeyError):
                reason = "render failed (no cache entry)"
            skipped.append({"source": p.item.source, "source_id": p.item.source_id, "reason": reason})
    stats = {
        "render_jobs": len(jobs),
        "cache_hits": len(jobs) - len(todo),
        "rendered": len(todo),
        "render_wall_seconds": round(wall, 2),
        "render_cpu_seconds": round(sum(render_seconds), 2),
        "slowest_render_seconds": round(max(render_seconds, default=0.0), 2),
        "workers": cfg.workers,
        "cache_dir": str(cache),
    }
    return written, {"stats": stats, "skipped": sorted(skipped, key=lambda s: (s["source"], s["source_id"]))}


# ------------------------------------------------------------------ output tables

def _image_size(data: bytes) -> tuple[int | None, int | None]:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.width, im.height
    except Exception:  # broken bytes are expected here (truncated, not_image); size unknown
        return None, None


def _tables(rows: list[Row], base_url: str, tmp: Path):
    import pyarrow as pa

    urls = [f"{base_url}/{r.url_path}" for r in rows]
    uids = [make_uid(u, r.text) for u, r in zip(urls, rows)]
    sha: list[str | None] = []
    width: list[int | None] = []
    height: list[int | None] = []
    for r in rows:
        digest, w, h = None, None, None
        if r.file is not None:
            data = (tmp / "www" / r.file).read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if r.expected_status == "success":
                w, h = _image_size(data)
        sha.append(digest)
        width.append(w)
        height.append(h)
    url_table = pa.table({"url": pa.array(urls, pa.string()), "text": pa.array([r.text for r in rows], pa.string())})
    truth = pa.table({
        "uid": pa.array(uids, pa.string()),
        "url": pa.array(urls, pa.string()),
        "source": pa.array([r.source for r in rows], pa.string()),
        "source_id": pa.array([r.source_id for r in rows], pa.string()),
        "original_text": pa.array([r.original_text for r in rows], pa.string()),
        "text": pa.array([r.text for r in rows], pa.string()),
        "noise": pa.array([r.noise for r in rows], pa.string()),
        "duplicate_of": pa.array([uids[r.duplicate_of] if r.duplicate_of is not None else None for r in rows],
                                 pa.string()),
        "expected_status": pa.array([r.expected_status for r in rows], pa.string()),
        "file": pa.array([f"www/{r.file}" if r.file else None for r in rows], pa.string()),
        "sha256": pa.array(sha, pa.string()),
        "width": pa.array(width, pa.int32()),
        "height": pa.array(height, pa.int32()),
    })
    return url_table, truth


def _write_evalsets(split, produced: set[str], eval_plans: dict[str, list], tmp: Path) -> dict:
    import pyarrow as pa

    out = {}
    for task in TASKS:
        rows = [(e, p) for e, p in zip(split.evalsets[task], eval_plans[task]) if p.rel in produced]
        classnames = split.classnames[task]
        if task == "tuxpaint_retrieval":  # re-number after any skipped render so labels stay 0..n-1
            classnames = [e.caption for e, _ in rows]
            labels = list(range(len(rows)))
        else:
            labels = [e.label for e, _ in rows]
        folder = tmp / "evalsets" / task
        table = pa.table({
            "image": pa.array([p.rel.split("/", 2)[2] for _, p in rows], pa.string()),
            "label": pa.array(labels, pa.int64()),
            "classname": pa.array([classnames[k] for k in labels], pa.string()),
            "caption": pa.array([e.caption for e, _ in rows], pa.string()),
            "source_id": pa.array([e.item.source_id for e, _ in rows], pa.string()),
            "sha256": pa.array([hashlib.sha256((tmp / p.rel).read_bytes()).hexdigest() for _, p in rows],
                               pa.string()),
        })
        write_parquet(folder / "index.parquet", table)
        (folder / "classnames.txt").write_text("\n".join(classnames) + "\n", encoding="utf-8")
        out[task] = {"n": len(rows), "classes": len(classnames)}
    return out


def summary_table(by_source_noise: dict[str, dict[str, int]]) -> str:
    """Rows by source x noise kind, as printed after a build."""
    sources = sorted(by_source_noise)
    kinds = sorted({k for d in by_source_noise.values() for k in d}, key=lambda k: (k != "none", k))
    w0 = max(len("noise"), *(len(k) for k in kinds), len("total"))
    widths = [max(len(s), 6) for s in sources]
    lines = ["  ".join(["noise".ljust(w0)] + [s.rjust(w) for s, w in zip(sources, widths)] + ["total".rjust(7)])]
    for k in kinds + ["total"]:
        vals = [sum(by_source_noise[s].values()) if k == "total" else by_source_noise[s].get(k, 0) for s in sources]
        lines.append("  ".join([k.ljust(w0)] + [str(v).rjust(w) for v, w in zip(vals, widths)]
                               + [str(sum(vals)).rjust(7)]))
    return "\n".join(lines)


# ------------------------------------------------------------------ the stage

def _prepare_out(cfg: OfflinePoolConfig) -> tuple[Path, dict | None]:
    """Check DIR; return its absolute path and the existing summary if it is already up to date."""
    out = Path(cfg.out).absolute()
    if out.exists() and not out.is_dir():
        raise CurateError(f"--out {out}: exists and is not a directory")
    meta = out / "pool_build.json"
    if meta.is_file() and (out / "urls.parquet").is_file() and not cfg.overwrite:
        try:
            prev = json.loads(meta.read_text())
        except ValueError:
            prev = {}
        if prev.get("fingerprint") == cfg.fingerprint():
            return out, prev
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise CurateError(f"--out {out}: directory exists and is not empty (built with other settings or not a pool); "
                          "pass --overwrite to replace it, or choose another folder")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CurateError(f"--out {out}: cannot create {parent}: {e.strerror or e}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CurateError(f"--out {out}: folder {parent} is not writable")
    return out, None


def shuffle_rows(rows: list, seed: int) -> list:
    """The pool's rows in a seeded order, with `duplicate_of` (a row index) remapped through the shuffle."""
    order = list(range(len(rows)))
    random.Random(f"{seed}:order").shuffle(order)
    new_index = {old: new for new, old in enumerate(order)}
    shuffled = [rows[i] for i in order]
    for r in shuffled:
        if r.duplicate_of is not None:
            r.duplicate_of = new_index[r.duplicate_of]
    return shuffled


def row_counts(rows) -> dict:
    """The pool's rows counted by source, noise kind, expected status and source x noise (pool_build.json)."""
    by_sn: dict[str, Counter] = {}
    for r in rows:
        by_sn.setdefault(r.source, Counter())[r.noise] += 1
    return {
        "by_source": dict(sorted(Counter(r.source for r in rows).items())),
        "by_noise": dict(sorted(Counter(r.noise for r in rows).items())),
        "by_expected_status": dict(sorted(Counter(r.expected_status for r in rows).items())),
        "by_source_and_noise": {s: dict(sorted(c.items())) for s, c in sorted(by_sn.items())},
    }


def build_offline(cfg: OfflinePoolConfig) -> dict:
    """Build the pool into cfg.out; return the summary (also written to DIR/pool_build.json)."""
    if cfg.size not in SIZES and cfg.size not in LARGE_SIZES:
        raise CurateError(f"--size {cfg.size!r}: expected one of {', '.join(SIZE_CHOICES)}")
    base_url = _check_base_url(cfg.base_url)
    out, up_to_date = _prepare_out(cfg)
    if up_to_date is not None:
        up_to_date["up_to_date"] = True
        return up_to_date
    if cfg.size in LARGE_SIZES:
        return build_large(cfg, out, base_url)
    timings: dict[str, float] = {}
    t_start = t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timings[name] = round(now - t, 2)
        t = now

    items = _select_sources(cfg)
    lap("read_sources")
    split = split_heldout(items, cfg.holdout, cfg.seed)
    lap("holdout")

    # A killed build leaves its temp folder behind; its renders survive in the cache, so just drop it.
    for stale in [*out.parent.glob(f".tmp-build-{out.name}-*"), *out.parent.glob(f".tmp-old-{out.name}-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-build-{out.name}-", dir=out.parent))
    except OSError as e:
        raise CurateError(f"--out {out}: cannot write in {out.parent}: {e.strerror or e}") from None
    try:
        pool_plans = [_plan_pool_image(it, cfg.seed, cfg.render) for it in split.pool]
        eval_plans: dict[str, list[Planned]] = {}
        for task in TASKS:
            eval_plans[task] = []
            for e in split.evalsets[task]:
                fid = file_id(cfg.seed, "eval", task, e.item.source_id)
                long_side = cfg.render.eval_long_side if e.item.is_svg else 0
                eval_plans[task].append(Planned(e.item, f"evalsets/{task}/images/{fid}.png", long_side, "png"))
        produced, render = _produce_images(pool_plans + [p for ps in eval_plans.values() for p in ps], tmp, cfg)
        lap("images")

        rows = [Row(p.item.source, p.item.source_id, p.item.caption, p.item.caption, p.rel[len("www/"):],
                    p.rel[len("www/"):], translations=p.item.translations)
                for p in pool_plans if p.rel in produced]
        www = tmp / "www"

        def read_file(rel: str) -> bytes:
            return (www / rel).read_bytes()

        def write_file(rel: str, data: bytes) -> None:
            _put(www / rel, data)

        n_base = len(rows)
        n_translatable = sum(1 for r in rows if r.source == "tuxpaint" and r.translations)
        rows = inject(rows, cfg.noise, cfg.seed, read_file, write_file)
        rows = shuffle_rows(rows, cfg.seed)
        lap("noise")

        url_table, truth = _tables(rows, base_url, tmp)
        write_parquet(tmp / "urls.parquet", url_table)
        write_parquet(tmp / "truth.parquet", truth)
        evalsets = _write_evalsets(split, produced, eval_plans, tmp)
        lap("tables")

        summary = {
            "format": FORMAT_VERSION,
            "fingerprint": cfg.fingerprint(),
            "seed": cfg.seed,
            "size": cfg.size,
            "base_url": base_url,
            "rows": len(rows),
            "base_rows": n_base,
            "tuxpaint_translatable_rows": n_translatable,
            "planned_noise": cfg.noise.planned(n_base, n_translatable),
            "counts": row_counts(rows),
            "evalsets": evalsets,
            "heldout_duplicates_dropped": split.dropped_as_heldout_duplicate,
            "skipped_images": render["skipped"],
            "render": render["stats"],
            "config": {"noise": asdict(cfg.noise), "holdout": asdict(cfg.holdout), "render": asdict(cfg.render)},
            "sources": {k: str(v) for k, v in asdict(cfg.sources.resolved()).items()},
            "expected_status_meaning": {
                "success": "decodable image; redirect rows reach it after 1-3 HTTP 302 hops",
                "404": "HTTP 404",
                "truncated": "HTTP 200, first 30-70% of an image file",
                "not_image": "HTTP 200, HTML/JSON/garbage bytes under an image name",
                "bomb": "HTTP 200, small PNG whose header declares >= 2.5e9 pixels",
                "oversized": f"HTTP 200, a real PNG of about {cfg.noise.oversized_bytes} bytes of noise",
            },
            "versions": _versions(),
        }
        timings["total"] = round(time.perf_counter() - t_start, 2)
        summary["timings"] = timings
        write_json(tmp / "pool_build.json", summary)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


# ------------------------------------------------------------------ the large pool

OPENCLIPART_LICENSE = "public-domain"   # Debian openclipart-svg: all art dedicated to the public domain
TUXPAINT_LICENSE = "GPL-2.0-or-later"   # Debian tuxpaint-stamps-default copyright file


def _debian_meta(item: SourceItem, pkg: dict, license: str, name: str) -> None:
    from curate.pool.offline.concepts import concept_key, display_name

    item.meta = {"package": pkg["name"], "version": pkg["version"], "license": license, "collection": "",
                 "style": item.source, "category": "", "concept": concept_key(name), "display": display_name(name),
                 "slug": "", "base": True}


def _select_large(cfg: OfflinePoolConfig, spec: LargeSpec):
    paths = cfg.sources.resolved()
    pool, style, packages = read_large_sources(spec, cfg.seed)
    stamps = read_tuxpaint(paths.tuxpaint)
    clipart = read_openclipart(paths.openclipart, sample=spec.openclipart, seed=cfg.seed)
    if spec.tuxpaint is not None and spec.tuxpaint < len(stamps):
        stamps = sorted(random.Random(f"{cfg.seed}:tuxpaint-sample").sample(stamps, spec.tuxpaint),
                        key=lambda s: s.source_id)
    deb_oc = debian_package("openclipart-svg", paths.openclipart, ("**/*.svg",))
    deb_tp = debian_package("tuxpaint-stamps-default", paths.tuxpaint, ("**/*.txt", "**/*.png", "**/*.svg"))
    packages["openclipart-svg"], packages["tuxpaint-stamps-default"] = deb_oc, deb_tp
    fc_root = Path(os.environ.get("CURATE_FREECIV") or FREECIV_DIR)
    if not (fc_root / "nation").is_dir():
        raise MissingDependencyError(f"Freeciv nations (expected at {fc_root / 'nation'})",
                                     "sudo apt-get install freeciv-data   (or: make setup)")
    deb_fc = debian_package("freeciv-data", fc_root, ("nation/*.ruleset", "flags/*.png"))
    packages["freeciv-data"] = deb_fc
    nations = read_freeciv(fc_root, deb_fc)
    if spec.freeciv is not None and spec.freeciv < len(nations):
        nations = sorted(random.Random(f"{cfg.seed}:freeciv-sample").sample(nations, spec.freeciv),
                         key=lambda s: s.source_id)
    pool = pool + nations
    for it in clipart:  # the concept is the title (keywords after the first comma are not the subject)
        _debian_meta(it, deb_oc, OPENCLIPART_LICENSE, it.caption.split(",", 1)[0])
    for it in stamps:
        _debian_meta(it, deb_tp, TUXPAINT_LICENSE, it.caption)
    for it in pool:
        it.meta["web_kind"] = web_kind(it)
    for it in clipart + stamps:
        it.meta["web_kind"] = "none"
    return clipart + stamps + pool, style, packages


def _plan_large_image(item: SourceItem, seed: int, lr: LargeRenderConfig) -> Planned:
    rng = random.Random(f"{seed}:render:{item.source}:{item.source_id}")
    fid = file_id(seed, item.source, item.source_id)
    fmt = "png_flat"
    if item.source == "iconify":
        side = lr.icon_side
    elif item.source == "openclipart":
        lo, hi = lr.clipart_small_range if rng.random() < lr.clipart_small_fraction else lr.clipart_large_range
        side = rng.randint(lo, hi)
        fmt = "jpeg" if rng.random() < lr.jpeg_fraction else "png_flat"
    elif item.source == "tuxpaint":
        side = rng.randint(*lr.stamp_range)
        fmt = "jpeg" if rng.random() < lr.jpeg_fraction else "png_flat"
    elif item.source == "freeciv":  # 44 x 30 px flags, served as upscaled thumbnails
        side = rng.choice(lr.flag_sizes)
    else:  # emoji in their own packages
        side = rng.choice(lr.emoji_sizes)
    ext = "jpg" if fmt == "jpeg" else "png"
    return Planned(item, f"www/{item.source}/{fid}.{ext}", side, fmt)


def _attribution(rows: list[Row], eval_items: dict[str, list]) -> dict:
    """One entry per (package, version, collection, licence) whose licence requires attribution."""
    entries: dict[tuple, dict] = {}

    def add(meta: dict, where: str) -> None:
        if not needs_attribution(meta["license"]):
            return
        key = (meta["package"], meta["version"], meta.get("collection", ""), meta["license"])
        e = entries.setdefault(key, {
            "package": meta["package"], "version": meta["version"], "collection": meta.get("collection", ""),
            "title": meta.get("set_name", meta.get("collection") or meta["package"]),
            "author": meta.get("author", ""), "author_url": meta.get("author_url", ""),
            "license": meta["license"], "license_url": meta.get("license_url", ""), "pool_rows": 0,
            "eval_items": 0})
        e[where] += 1

    for r in rows:
        if r.meta:
            add(r.meta, "pool_rows")
    for items in eval_items.values():
        for e in items:
            add(e.item.meta, "eval_items")
    return {"note": "Art in this pool and its evaluation sets under licences that require attribution. "
                    "Keep this file with any copy of the pool.",
            "entries": [entries[k] for k in sorted(entries)]}


def _attribution_md(att: dict) -> str:
    lines = ["# Attribution", "", att["note"], "", "| package | version | set | author | licence | pool rows | eval items |",
             "|---|---|---|---|---|---:|---:|"]
    for e in att["entries"]:
        author = f"[{e['author']}]({e['author_url']})" if e["author_url"] else e["author"]
        lic = f"[{e['license']}]({e['license_url']})" if e["license_url"] else e["license"]
        lines.append(f"| {e['package']} | {e['version']} | {e['title']} | {author} | {lic} | {e['pool_rows']} | "
                     f"{e['eval_items']} |")
    return "\n".join(lines) + "\n"


def _write_evalsets_v2(split, produced: set[str], eval_plans: dict[str, list], tmp: Path) -> dict:
    import pyarrow as pa

    out = {}
    for task, (ttype, group) in V2_TASKS.items():
        rows = [(e, p) for e, p in zip(split.evalsets[task], eval_plans[task]) if p.rel in produced]
        if ttype == "retrieval":  # re-number after any skipped render so labels stay 0..n-1
            classnames = [e.caption for e, _ in rows]
            labels = list(range(len(rows)))
        else:
            classnames = split.classnames[task]
            labels = [e.label for e, _ in rows]
        folder = tmp / "evalsets" / task
        m = [e.item.meta for e, _ in rows]
        table = pa.table({
            "image": pa.array([p.rel.split("/", 2)[2] for _, p in rows], pa.string()),
            "label": pa.array(labels, pa.int64()),
            "classname": pa.array([classnames[k] for k in labels], pa.string()),
            "caption": pa.array([e.caption for e, _ in rows], pa.string()),
            "source": pa.array([e.item.source for e, _ in rows], pa.string()),
            "source_id": pa.array([e.item.source_id for e, _ in rows], pa.string()),
            "package": pa.array([x["package"] for x in m], pa.string()),
            "package_version": pa.array([x["version"] for x in m], pa.string()),
            "license": pa.array([x["license"] for x in m], pa.string()),
            "collection": pa.array([x.get("collection", "") for x in m], pa.string()),
            "concept": pa.array([x["concept"] for x in m], pa.string()),
            "sha256": pa.array([hashlib.sha256((tmp / p.rel).read_bytes()).hexdigest() for _, p in rows],
                               pa.string()),
        })
        write_parquet(folder / "index.parquet", table)
        (folder / "classnames.txt").write_text("\n".join(classnames) + "\n", encoding="utf-8")
        (folder / "task.json").write_text(json.dumps({"type": ttype, "group": group, "n": len(rows),
                                                      "classes": len(set(labels))}, sort_keys=True))
        out[task] = {"n": len(rows), "classes": len(set(labels)), "type": ttype, "group": group}
    return out


def _drop_eval_copies(pool_plans: list[Planned], eval_plans: dict[str, list[Planned]], produced: set[str],
                      tmp: Path, cfg: OfflinePoolConfig) -> dict:
    """After rendering: drop pool images that equal any evaluation image byte for byte, or that are
    perceptual near copies (curate/pool/offline/phash.py) of an in-domain one. Removes them from
    `produced` and from www/; returns what was dropped and the rule."""
    from curate.pool.offline.phash import NEAR_COPY_BITS, dhash_files, nearest_bits

    pool = [p for p in pool_plans if p.rel in produced]
    eval_sha = {hashlib.sha256((tmp / p.rel).read_bytes()).hexdigest()
                for ps in eval_plans.values() for p in ps if p.rel in produced}
    in_domain = [str(tmp / p.rel) for t, ps in eval_plans.items() if V2_TASKS[t][1] == "in_domain"
                 for p in ps if p.rel in produced]
    paths = [str(tmp / p.rel) for p in pool]
    chunks = [paths[i:i + 2000] for i in range(0, len(paths), 2000)]
    if len(chunks) > 1 and cfg.workers > 1:
        parts = [h for _, h in pmap(dhash_files, chunks, backend=Backend("process", cfg.workers),
                                    label=lambda c: f"perceptual hashes of {len(c)} pool images")]
    else:
        parts = [dhash_files(c) for c in chunks]
    import numpy as np

    pool_hashes = np.concatenate(parts) if parts else np.zeros((0, 32), np.uint8)
    near = nearest_bits(pool_hashes, dhash_files(in_domain))
    same, close = [], []
    for p, path, bits in zip(pool, paths, near):
        if hashlib.sha256(Path(path).read_bytes()).hexdigest() in eval_sha:
            same.append(f"{p.item.source}:{p.item.source_id}")
        elif bits <= NEAR_COPY_BITS:
            close.append(f"{p.item.source}:{p.item.source_id}")
        else:
            continue
        produced.discard(p.rel)
        os.remove(path)
    return {"rule": f"pool image bytes equal to an evaluation image, or a 256-bit DCT hash within {NEAR_COPY_BITS} "
                    "bits of an in-domain evaluation image (curate/pool/offline/phash.py)",
            "byte_copies": sorted(same), "near_copies": sorted(close)}


def build_large(cfg: OfflinePoolConfig, out: Path, base_url: str) -> dict:
    """`--size large` / `large-mini`: the 8-source pool with web-crawl noise and suite v2."""
    import pyarrow as pa

    spec = LARGE_SIZES[cfg.size]
    timings: dict[str, float] = {}
    t_start = t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timings[name] = round(now - t, 2)
        t = now

    items, style, packages = _select_large(cfg, spec)
    lap("read_sources")
    split = split_v2(items, style, spec, cfg.seed)
    for it in split.pool:  # the deny-list, enforced on what is about to be written
        check_allowed(it.meta["package"], it.meta.get("collection", ""), it.meta["license"], f"pool item {it.source_id}")
    for task, evs in split.evalsets.items():
        for e in evs:
            m = e.item.meta
            check_allowed(m["package"], m.get("collection", ""), m["license"], f"evaluation set {task}: {e.item.source_id}")
    lap("holdout")

    for stale in [*out.parent.glob(f".tmp-build-{out.name}-*"), *out.parent.glob(f".tmp-old-{out.name}-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-build-{out.name}-", dir=out.parent))
    except OSError as e:
        raise CurateError(f"--out {out}: cannot write in {out.parent}: {e.strerror or e}") from None
    try:
        lr = cfg.large_render
        pool_plans = [_plan_large_image(it, cfg.seed, lr) for it in split.pool]
        eval_plans: dict[str, list[Planned]] = {}
        for task in V2_TASKS:
            eval_plans[task] = [Planned(e.item, f"evalsets/{task}/images/{file_id(cfg.seed, 'eval', task, e.item.source, e.item.source_id)}.png",
                                        lr.eval_side, "png_flat") for e in split.evalsets[task]]
        produced, render = _produce_images(pool_plans + [p for ps in eval_plans.values() for p in ps], tmp, cfg)
        lap("images")
        near_copies = _drop_eval_copies(pool_plans, eval_plans, produced, tmp, cfg)
        lap("decontaminate")

        rows = [Row(p.item.source, p.item.source_id, p.item.caption, p.item.caption, p.rel[len("www/"):],
                    p.rel[len("www/"):], translations=p.item.translations, meta=p.item.meta)
                for p in pool_plans if p.rel in produced]
        www = tmp / "www"

        def read_file(rel: str) -> bytes:
            return (www / rel).read_bytes()

        def write_file(rel: str, data: bytes) -> None:
            _put(www / rel, data)

        n_base = len(rows)
        web = tag_web_noise(rows, cfg.boilerplate, cfg.seed)
        n_translatable = sum(1 for r in rows if r.source == "tuxpaint" and r.translations and r.noise == "none")
        rows = inject(rows, cfg.large_noise, cfg.seed, read_file, write_file)
        rows = shuffle_rows(rows, cfg.seed)
        lap("noise")

        url_table, truth = _tables(rows, base_url, tmp)
        for name, key in (("package", "package"), ("package_version", "version"), ("license", "license"),
                          ("collection", "collection"), ("concept", "concept")):
            truth = truth.append_column(name, pa.array([r.meta.get(key, "") for r in rows], pa.string()))
        write_parquet(tmp / "urls.parquet", url_table)
        write_parquet(tmp / "truth.parquet", truth)
        trusted = url_table.filter(pa.array([r.source in TRUSTED_SOURCES for r in rows]))
        trusted = trusted.add_column(0, "uid", truth.column("uid").filter(
            pa.array([r.source in TRUSTED_SOURCES for r in rows])))
        write_parquet(tmp / "trusted.parquet", trusted)
        evalsets = _write_evalsets_v2(split, produced, eval_plans, tmp)
        att = _attribution(rows, split.evalsets)
        write_json(tmp / "ATTRIBUTION.json", att)
        (tmp / "ATTRIBUTION.md").write_text(_attribution_md(att), encoding="utf-8")
        lap("tables")

        summary = {
            "format": FORMAT_VERSION,
            "fingerprint": cfg.fingerprint(),
            "seed": cfg.seed,
            "size": cfg.size,
            "base_url": base_url,
            "rows": len(rows),
            "base_rows": n_base,
            "tuxpaint_translatable_rows": n_translatable,
            "web_noise_of_base_rows": web,
            "planned_noise": cfg.large_noise.planned(n_base, n_translatable),
            "counts": {**row_counts(rows),
                       "by_license": dict(sorted(Counter(r.meta.get("license", "") for r in rows).items()))},
            "trusted": {"rule": f"rows whose source is one of {', '.join(TRUSTED_SOURCES)} (by source, not by truth)",
                        "sources": list(TRUSTED_SOURCES), "rows": trusted.num_rows, "file": "trusted.parquet"},
            "evalsets": evalsets,
            "zero_shot": {"rule": "concept key (curate/pool/offline/concepts.py) of every in-domain evaluation "
                                  "item is absent from every pool source; held-out styles and icon sets never "
                                  "enter the pool; pool items with an evaluation item's bytes are dropped",
                          "heldout_concepts": len({e.item.meta["concept"] for t, (_, g) in V2_TASKS.items()
                                                   if g == "in_domain" for e in split.evalsets[t]})},
            "heldout_duplicates_dropped": split.dropped_as_heldout_duplicate,
            "eval_copies_dropped": near_copies,
            "skipped_images": render["skipped"],
            "render": render["stats"],
            "packages": {k: {kk: vv for kk, vv in v.items() if kk != "root"} for k, v in sorted(packages.items())},
            "config": {"noise": asdict(cfg.large_noise), "spec": asdict(spec), "render": asdict(cfg.large_render),
                       "boilerplate": cfg.boilerplate},
            "versions": _versions(),
        }
        timings["total"] = round(time.perf_counter() - t_start, 2)
        summary["timings"] = timings
        write_json(tmp / "pool_build.json", summary)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished build onto `out` (an existing `out` is moved aside first, then removed)."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".tmp-old-{out.name}-", dir=out.parent))
        os.replace(out, old / "pool")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _versions() -> dict:
    import PIL
    import pyarrow

    return {"curate": __version__, "python": platform.python_version(), "cairosvg": _cairosvg_version(),
            "pillow": PIL.__version__, "pyarrow": pyarrow.__version__}


@click.command("build-offline")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Folder to create: www/, urls.parquet, truth.parquet, evalsets/, pool_build.json.")
@click.option("--seed", default=0, show_default=True, help="Seed for sampling, rendering sizes, noise and held-out splits.")
@click.option("--size", type=click.Choice(SIZE_CHOICES), default="full", show_default=True,
              help="full: every source image (>= 12,000 rows); small: ~1,500 rows for tests and quick looks; "
                   "large: >= 100,000 rows from 8 sources with the v2 evaluation suite (needs `make large-sources`); "
                   "large-mini: the large pool's mix at ~1,000 rows (CI).")
@click.option("--base-url", default=DEFAULT_BASE_URL, show_default=True,
              help="URL prefix written into urls.parquet; `curate pool serve DIR` listens on its port.")
@click.option("--overwrite", is_flag=True, help="Replace an existing, non-empty --out folder.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64), help="SVG render processes.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="SVG render cache (default: $CURATE_CACHE/render or ~/.cache/curate/render).")
@click.option("--openclipart-dir", type=click.Path(path_type=Path), default=None,
              help="openclipart SVG root (default: $CURATE_OPENCLIPART or /usr/share/openclipart/svg).")
@click.option("--tuxpaint-dir", type=click.Path(path_type=Path), default=None,
              help="Tux Paint stamps root (default: $CURATE_TUXPAINT or /usr/share/tuxpaint/stamps).")
@click.option("--twemoji-dir", type=click.Path(path_type=Path), default=None,
              help="emoji-datasource-twitter package (default: $CURATE_TWEMOJI or "
                   "$CURATE_DEPS/node_modules/emoji-datasource-twitter).")
def build_offline_cmd(out: Path, seed: int, size: str, base_url: str, overwrite: bool, workers: int,
                      cache_dir: Path | None, openclipart_dir: Path | None, tuxpaint_dir: Path | None,
                      twemoji_dir: Path | None) -> None:
    """Build a real image-text pool that works with no internet.

    Images come from openclipart (noisy real titles and keywords), Tux Paint stamps (clean English
    captions, real translations) and Twemoji (names, country flags). Seeded web-like noise is injected
    (swapped captions, exact/near duplicates, 404s, truncated and non-image files, a decompression
    bomb, oversized files, redirects, non-English and empty captions) and recorded per row in
    truth.parquet. Held-out evaluation splits go to evalsets/ and never enter the pool. Serve the
    result with `curate pool serve DIR`.
    """
    cfg = OfflinePoolConfig(out=out, seed=seed, size=size, base_url=base_url, overwrite=overwrite,
                            workers=workers, cache_dir=cache_dir,
                            sources=SourcePaths(openclipart_dir, tuxpaint_dir, twemoji_dir))
    summary = build_offline(cfg)
    if summary.get("up_to_date"):
        click.echo(f"{out}: already up to date ({summary['rows']} rows, seed {summary['seed']}, size {summary['size']})")
        return
    click.echo(summary_table(summary["counts"]["by_source_and_noise"]))
    ev = ", ".join(f"{t} {v['n']} images/{v['classes']} classes" for t, v in summary["evalsets"].items())
    r = summary["render"]
    click.echo(f"\n{summary['rows']} rows -> {out}/urls.parquet (truth: truth.parquet)\n"
               f"held out: {ev}\n"
               f"rendered images: {r['render_jobs']} ({r['cache_hits']} cached, {r['rendered']} rendered in "
               f"{r['render_wall_seconds']} s, {len(summary['skipped_images'])} skipped); "
               f"total {summary['timings']['total']} s\n"
               f"serve it: curate pool serve {out}")
