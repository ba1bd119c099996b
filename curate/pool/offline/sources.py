"""Find and read the three real offline image sources, and render SVGs.

- openclipart (Debian `openclipart-svg`): ~7,458 unique public-domain SVGs. Captions are the real
  <dc:title> plus <rdf:li> keywords, which are as noisy as web alt-text ("gramastar", "Part of the
  Flat Icon Collection (Wed Aug 25 ...)", Italian titles). The package lists many files under several
  folders as symlinks; we keep one item per distinct file (real path, then bytes).
- Tux Paint stamps (Debian `tuxpaint-stamps-default`): PNG/SVG with a clean English caption on the
  first line of the .txt and real translations as `xx.utf8=...` lines.
- Twemoji (npm `emoji-datasource-twitter`): 64 px PNGs named in emoji.json, with category,
  subcategory (country flags) and skin-tone variants.

Source ids are the path relative to the source root (or the emoji image name); they are only ever
used as data, never as output file names (build.py generates ids).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import signal
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from curate.core.errors import MissingDependencyError

REPO_ROOT = Path(__file__).resolve().parents[3]

_NS = {
    "dc": "http://purl.org/dc/elements/1.1/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "cc": "http://web.resource.org/cc/",
}

SKIN_TONES = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}


def deps_dir() -> Path:
    """Where `make setup` puts npm packages: $CURATE_DEPS, else <repo root>/.deps."""
    return Path(os.environ.get("CURATE_DEPS") or REPO_ROOT / ".deps")


@dataclass(frozen=True)
class SourcePaths:
    """Roots of the three sources; None = environment variable, else the default install place."""

    openclipart: Path | None = None
    tuxpaint: Path | None = None
    twemoji: Path | None = None

    def resolved(self) -> "SourcePaths":
        return SourcePaths(
            openclipart=Path(self.openclipart or os.environ.get("CURATE_OPENCLIPART") or "/usr/share/openclipart/svg"),
            tuxpaint=Path(self.tuxpaint or os.environ.get("CURATE_TUXPAINT") or "/usr/share/tuxpaint/stamps"),
            twemoji=Path(self.twemoji or os.environ.get("CURATE_TWEMOJI")
                         or deps_dir() / "node_modules" / "emoji-datasource-twitter"),
        )


@dataclass
class SourceItem:
    """One real image with its real caption(s)."""

    source: str                 # "openclipart" | "tuxpaint" | "twemoji"
    source_id: str              # stable id within the source (relative path / emoji image name)
    path: Path                  # file to read (.svg or .png)
    caption: str                # the caption as the source gives it
    translations: dict[str, str] = field(default_factory=dict)   # tuxpaint: lang -> caption
    category: str = ""          # twemoji category
    subcategory: str = ""       # twemoji subcategory
    group: str = ""             # items sharing a group are held out together (emoji + its skin tones)
    country: str = ""           # twemoji country flags: the country name
    # Used by the large pool only (curate/pool/offline/large.py); the small/full builds ignore them.
    code: str = ""              # emoji: the code point sequence ("1F44D-1F3FB")
    data: bytes | None = field(default=None, repr=False)   # in-memory SVG (iconify icons have no file)
    meta: dict = field(default_factory=dict, repr=False)   # package, version, license, collection, concept, ...

    @property
    def is_svg(self) -> bool:
        return self.data is not None or self.path.suffix.lower() == ".svg"

    def read_bytes(self) -> bytes:
        return self.data if self.data is not None else self.path.read_bytes()


def _require(path: Path, what: str, install: str) -> None:
    if not path.exists():
        raise MissingDependencyError(f"{what} (expected at {path})", install)


def _clean(s: str | None) -> str:
    return re.sub(r"\s+", " ", s or "").strip()


def openclipart_caption(svg: bytes, fallback: str) -> str:
    """Title plus keywords, exactly as the clip-art author wrote them (noise included)."""
    try:
        root = ET.fromstring(svg)  # ElementTree never resolves external entities
    except ET.ParseError:
        return fallback
    work = root.find(".//cc:Work", _NS)
    title = _clean(work.findtext("dc:title", default="", namespaces=_NS)) if work is not None else ""
    keywords: list[str] = []
    for li in root.iterfind(".//dc:subject//rdf:li", _NS):
        kw = _clean(li.text)
        if kw and kw not in keywords:
            keywords.append(kw)
    title = title or fallback
    return f"{title}, {', '.join(keywords[:6])}" if keywords else title


def read_openclipart(root: Path, sample: int | None = None, seed: int = 0) -> list[SourceItem]:
    """Unique SVG files (symlinked and byte-identical copies dropped), optionally a seeded sample.

    Captions are parsed only for the items kept: parsing all 180 MB of SVG XML costs ~8 s, which the
    small test pool should not pay.
    """
    _require(root, "openclipart SVGs", "sudo apt-get install openclipart-svg   (or: make setup)")
    seen_real: set[str] = set()
    seen_sha: set[str] = set()
    unique: list[tuple[str, Path]] = []
    for p in sorted(root.rglob("*.svg")):
        real = os.path.realpath(p)
        if real in seen_real or not os.path.isfile(real):
            continue
        seen_real.add(real)
        digest = hashlib.sha256(Path(real).read_bytes()).hexdigest()
        if digest in seen_sha:
            continue
        seen_sha.add(digest)
        unique.append((p.relative_to(root).as_posix(), Path(real)))
    if not unique:
        raise MissingDependencyError(f"openclipart SVGs (none found under {root})",
                                     "sudo apt-get install openclipart-svg   (or: make setup)")
    if sample is not None and sample < len(unique):
        unique = sorted(random.Random(f"{seed}:openclipart-sample").sample(unique, sample))
    items = []
    for rel, real in unique:
        fallback = Path(rel).stem.replace("_", " ").replace("-", " ")
        items.append(SourceItem("openclipart", rel, real, openclipart_caption(real.read_bytes(), fallback)))
    return items


def read_tuxpaint(root: Path) -> list[SourceItem]:
    """One item per stamp .txt that has an image next to it (PNG preferred, else SVG)."""
    _require(root, "Tux Paint stamps", "sudo apt-get install tuxpaint-stamps-default   (or: make setup)")
    items = []
    for txt in sorted(root.rglob("*.txt")):
        image = next((txt.with_suffix(ext) for ext in (".png", ".svg") if txt.with_suffix(ext).is_file()), None)
        if image is None:
            continue
        lines = txt.read_text(encoding="utf-8", errors="replace").splitlines()
        caption = _clean(lines[0]) if lines else ""
        if not caption:
            continue
        translations = {}
        for line in lines[1:]:
            lang, sep, text = line.partition(".utf8=")
            text = _clean(text)
            if sep and text and not lang.startswith("en") and text != caption:
                translations[lang.strip()] = text
        rel = image.relative_to(root).as_posix()
        items.append(SourceItem("tuxpaint", rel, image, caption, translations=translations))
    if not items:
        raise MissingDependencyError(f"Tux Paint stamps (none found under {root})",
                                     "sudo apt-get install tuxpaint-stamps-default   (or: make setup)")
    return items


def emoji_caption(name: str) -> str:
    return _clean(name).lower()


def read_twemoji(root: Path, vendor: str = "twitter", source: str = "twemoji",
                 install: str = "make setup   (runs: npm install --prefix .deps emoji-datasource-twitter@16.0.0)",
                 ) -> list[SourceItem]:
    """Base emoji and their skin-tone variants (same group), excluding bare skin-tone swatches.

    `vendor`/`source` read another emoji-datasource package of the same layout (the large pool
    reads emoji-datasource-google as source "noto")."""
    meta = root / "emoji.json"
    _require(meta, f"npm package emoji-datasource-{vendor}", install)
    img_dir = root / "img" / vendor / "64"
    try:
        entries = json.loads(meta.read_text(encoding="utf-8"))
    except ValueError as e:
        raise MissingDependencyError(f"a readable {meta} ({e})", install) from None
    items = []
    for e in sorted(entries, key=lambda e: e["image"]):
        if e.get("category") == "Component" or not e.get(f"has_img_{vendor}", True):
            continue
        image = img_dir / Path(e["image"]).name
        if not image.is_file():
            continue
        name = _clean(e.get("name") or e.get("short_name") or "")
        if not name:
            continue
        cat, sub = e.get("category", ""), e.get("subcategory", "")
        country = ""
        caption = emoji_caption(name)
        if sub == "country-flag":
            country = re.sub(r"\s+Flag$", "", name, flags=re.I)
            caption = f"Flag: {country}"
        base = SourceItem(source, image.name, image, caption, category=cat, subcategory=sub,
                          group=image.name, country=country, code=e.get("unified", ""))
        items.append(base)
        for tones, var in sorted((e.get("skin_variations") or {}).items()):
            vimg = img_dir / Path(var["image"]).name
            if not vimg.is_file():
                continue
            tone_text = ", ".join(SKIN_TONES.get(t, t.lower()) for t in tones.split("-"))
            items.append(SourceItem(source, vimg.name, vimg, f"{base.caption}: {tone_text}", category=cat,
                                    subcategory=sub, group=image.name, code=var.get("unified", "")))
    if not items:
        raise MissingDependencyError(f"Twemoji PNGs (none found under {img_dir})", install)
    return items


# ---------------------------------------------------------------- rendering (runs in worker processes)

class RenderTimeout(BaseException):
    """Raised by SIGPROF; a BaseException so that no `except Exception` inside cairosvg swallows it."""


def _on_alarm(signum, frame):
    raise RenderTimeout


def render_svg(svg: bytes, long_side: int, max_pixels: int, time_limit: float) -> bytes:
    """Render SVG bytes to an RGBA PNG whose longer side is `long_side` pixels.

    cairosvg is run with unsafe=False (no external files or entities). `time_limit` is CPU seconds
    (SIGPROF), deliberately not wall time: a wall-clock limit skips different files on a busy machine
    and breaks "same seed, same bytes". Rendering works on bytes in memory, so it cannot block
    without using CPU. Signals need a process's main thread (the worker processes of build.py).
    """
    import cairosvg.parser
    import cairosvg.surface

    class _Probe(cairosvg.surface.PNGSurface):
        """Computes the SVG's natural size without drawing it."""

        def draw(self, node):  # noqa: D102 - skip drawing
            return None

    previous = signal.signal(signal.SIGPROF, _on_alarm)
    signal.setitimer(signal.ITIMER_PROF, time_limit)
    try:
        tree = cairosvg.parser.Tree(bytestring=svg, unsafe=False)
        probe = _Probe(tree, None, 96)
        w, h = probe.width, probe.height
        if not w or not h:
            raise ValueError("SVG has no size")
        if w >= h:
            kw = {"output_width": long_side}
            other = h * long_side / w
        else:
            kw = {"output_height": long_side}
            other = w * long_side / h
        if other < 1 or long_side * other > max_pixels:
            raise ValueError(f"degenerate aspect ratio {w}x{h}")
        buf = io.BytesIO()
        surface = cairosvg.surface.PNGSurface(tree, buf, 96, **kw)
        surface.finish()
        return buf.getvalue()
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


@dataclass(frozen=True)
class RenderJob:
    path: str          # SVG file (rendered) or PNG file (resized so its long side is long_side)
    long_side: int
    fmt: str           # "png" | "jpeg" | "png_flat" (PNG flattened on white: glyphs drawn on transparency)
    cache_file: str    # where the encoded result (or a .fail note) goes
    max_source_bytes: int
    max_pixels: int
    time_limit: float
    data: bytes | None = None   # SVG bytes held in memory (iconify icons); then `path` only names them


def resize_png(data: bytes, long_side: int, max_pixels: int) -> bytes:
    """Resize a raster image (Twemoji are 64 px) so its long side is `long_side`, as an RGBA PNG."""
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    if im.width * im.height > max_pixels:
        raise ValueError(f"{im.width}x{im.height} exceeds the pixel cap {max_pixels}")
    im = im.convert("RGBA")
    s = long_side / max(im.size)
    im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    im.save(out, "PNG")
    return out.getvalue()


def encode_image(png_rgba: bytes, fmt: str) -> bytes:
    """Encode a rendered PNG as the served format (JPEG is flattened on white, as browsers save it)."""
    from PIL import Image

    if fmt == "png":
        return png_rgba
    im = Image.open(io.BytesIO(png_rgba)).convert("RGBA")
    bg = Image.new("RGB", im.size, (255, 255, 255))
    bg.paste(im, mask=im.getchannel("A"))
    out = io.BytesIO()
    if fmt == "png_flat":
        bg.save(out, "PNG")
    else:
        bg.save(out, "JPEG", quality=88, optimize=False)
    return out.getvalue()


def run_render_job(job: RenderJob) -> tuple[str, float, str]:
    """Worker entry: render + encode into the cache. Returns (status ok|skipped, seconds, reason)."""
    from curate.core.atomic import write_bytes, write_json

    t0 = time.perf_counter()
    size = len(job.data) if job.data is not None else os.path.getsize(job.path)
    reason = ""
    if size > job.max_source_bytes:
        reason = f"file is {size} bytes > limit {job.max_source_bytes}"
    else:
        try:
            data = job.data if job.data is not None else Path(job.path).read_bytes()
            if job.data is not None or job.path.lower().endswith(".svg"):
                png = render_svg(data, job.long_side, job.max_pixels, job.time_limit)
            else:
                png = resize_png(data, job.long_side, job.max_pixels)
            write_bytes(job.cache_file, encode_image(png, job.fmt))
            return "ok", time.perf_counter() - t0, ""
        except RenderTimeout:
            reason = f"render took longer than {job.time_limit:g} CPU seconds"
        except MemoryError:
            reason = "out of memory while rendering"
        except Exception as e:  # cairosvg raises many types on malformed SVG; all mean "skip this file"
            reason = f"{type(e).__name__}: {str(e)[:200]}"
    write_json(job.cache_file + ".fail", {"reason": reason})
    return "skipped", time.perf_counter() - t0, reason
