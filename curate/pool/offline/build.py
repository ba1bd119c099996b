"""`curate pool build-offline`: a real, noisy image-text pool built from offline sources.

Steps: read the sources -> hold out the evaluation splits -> render/copy the pool images into www/
(SVGs rendered by cairosvg in a process pool, with a per-file time/size limit and a render cache)
-> inject seeded noise -> write urls.parquet, truth.parquet, evalsets/ and pool_build.json.

Everything is built in a temporary sibling folder and renamed into place at the end, so DIR is
either the complete previous pool or the complete new one. The same seed gives byte-identical
files (pool_build.json differs only in its "timings" and "render" run statistics).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from curate.core.version import __version__
from curate.core.atomic import write_json, write_parquet
from curate.core.errors import CurateError
from curate.pool.offline.evalsplits import TASKS, HoldoutConfig, split_heldout
from curate.pool.offline.noise import NoiseConfig, Row, file_id, inject
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

    def fingerprint(self) -> str:
        """What determines the output bytes (not where it goes, not how fast)."""
        d = {
            "format": FORMAT_VERSION, "curate": __version__, "seed": self.seed, "size": self.size,
            "base_url": self.base_url.rstrip("/"), "noise": asdict(self.noise), "holdout": asdict(self.holdout),
            "render": asdict(self.render), "sources": {k: str(v) for k, v in asdict(self.sources.resolved()).items()},
        }
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


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
            src = p.item.path.read_bytes()
            params = (f"|{p.long_side}|{p.fmt}|cairosvg {cver}|pillow {PIL.__version__}"
                      f"|limits {rc.max_source_bytes} {rc.max_pixels} {rc.time_limit}|v1")
            key = hashlib.sha256(src + params.encode()).hexdigest()
            cfile = cache / key[:2] / f"{key}.{p.fmt}"
            jobs.append((p, RenderJob(str(p.item.path), p.long_side, p.fmt, str(cfile), rc.max_source_bytes,
                                      rc.max_pixels, rc.time_limit)))
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
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=max(1, cfg.workers), mp_context=ctx) as ex:
            bar = tqdm(ex.map(run_render_job, todo, chunksize=8), total=len(todo), desc="render",
                       unit="img", disable=not (cfg.progress and sys.stderr.isatty()))
            for _status, secs, _reason in bar:
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


def build_offline(cfg: OfflinePoolConfig) -> dict:
    """Build the pool into cfg.out; return the summary (also written to DIR/pool_build.json)."""
    if cfg.size not in SIZES:
        raise CurateError(f"--size {cfg.size!r}: expected one of {', '.join(SIZES)}")
    base_url = _check_base_url(cfg.base_url)
    out, up_to_date = _prepare_out(cfg)
    if up_to_date is not None:
        up_to_date["up_to_date"] = True
        return up_to_date
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
        rows_order = list(range(len(rows)))
        random.Random(f"{cfg.seed}:order").shuffle(rows_order)
        # duplicate_of holds row indices: remap them through the shuffle
        new_index = {old: new for new, old in enumerate(rows_order)}
        shuffled = [rows[i] for i in rows_order]
        for r in shuffled:
            if r.duplicate_of is not None:
                r.duplicate_of = new_index[r.duplicate_of]
        rows = shuffled
        lap("noise")

        url_table, truth = _tables(rows, base_url, tmp)
        write_parquet(tmp / "urls.parquet", url_table)
        write_parquet(tmp / "truth.parquet", truth)
        evalsets = _write_evalsets(split, produced, eval_plans, tmp)
        lap("tables")

        by_sn: dict[str, Counter] = {}
        for r in rows:
            by_sn.setdefault(r.source, Counter())[r.noise] += 1
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
            "counts": {
                "by_source": dict(sorted(Counter(r.source for r in rows).items())),
                "by_noise": dict(sorted(Counter(r.noise for r in rows).items())),
                "by_expected_status": dict(sorted(Counter(r.expected_status for r in rows).items())),
                "by_source_and_noise": {s: dict(sorted(c.items())) for s, c in sorted(by_sn.items())},
            },
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
@click.option("--size", type=click.Choice(sorted(SIZES)), default="full", show_default=True,
              help="full: every source image (>= 12,000 rows); small: ~1,500 rows for tests and quick looks.")
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
