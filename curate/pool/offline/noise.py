"""Seeded noise injection: turn clean (image, caption) rows into a pool that is noisy the way a web
crawl is, and record every injected fault so filters can be measured against the truth.

Each row carries exactly one noise kind (disjoint sets), so the counts per kind are exact and a
filter's recall on a kind is unambiguous:

  modified rows   caption_swap, non_english, empty_caption, redirect
  added rows      exact_dup, near_dup_reencode, near_dup_resize, near_dup_crop   (duplicate_of = original)
  broken rows     http_404, truncated, not_image, bomb, oversized

The large pool (`--size large`) adds web-crawl kinds, assigned before the seeded ones and never
combined with them (curate/pool/offline/large.py `tag_web_noise`):

  real rows       brand_logo (logo/programming icon sets: a brand name is the caption),
                  ui_glyph (UI icon sets' arrows, chevrons, toggles: low value, not wrong),
                  cross_source_copy (iconify's copies of an emoji art the pool also has from its own package)
  modified rows   boilerplate (the caption replaced by alt-text boilerplate: "image", "icon 24px", ...)
"""

from __future__ import annotations

import hashlib
import io
import random
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

# expected_status: what a careful downloader should end with for the row.
SUCCESS, HTTP_404, TRUNCATED, NOT_IMAGE, BOMB, OVERSIZED = "success", "404", "truncated", "not_image", "bomb", "oversized"

MODIFY_KINDS = ("caption_swap", "non_english", "empty_caption", "redirect")
DUP_KINDS = ("exact_dup", "near_dup_reencode", "near_dup_resize", "near_dup_crop")
BROKEN_KINDS = ("http_404", "truncated", "not_image", "bomb", "oversized")
ALL_KINDS = ("none",) + MODIFY_KINDS + DUP_KINDS + BROKEN_KINDS
WEB_KINDS = ("brand_logo", "ui_glyph", "cross_source_copy", "boilerplate")


@dataclass(frozen=True)
class NoiseConfig:
    """Fractions are of the clean base rows (non_english: of the Tux Paint rows); bomb/oversized are counts."""

    caption_swap: float = 0.20
    non_english: float = 0.30
    empty_caption: float = 0.01
    redirect: float = 0.01
    exact_dup: float = 0.05
    near_dup: float = 0.05
    http_404: float = 0.015
    truncated: float = 0.01
    not_image: float = 0.01
    bomb: int = 3
    oversized: int = 3
    oversized_bytes: int = 4_000_000
    max_redirect_hops: int = 3

    def planned(self, n_base: int, n_tuxpaint_translatable: int) -> dict[str, int]:
        """Exact number of rows per noise kind for a pool with `n_base` clean rows."""
        near = round(self.near_dup * n_base)
        return {
            "caption_swap": round(self.caption_swap * n_base),
            "non_english": round(self.non_english * n_tuxpaint_translatable),
            "empty_caption": round(self.empty_caption * n_base),
            "redirect": round(self.redirect * n_base),
            "exact_dup": round(self.exact_dup * n_base),
            # near duplicates split evenly over the three kinds (remainder to the first ones)
            **{k: near // 3 + (i < near % 3) for i, k in enumerate(DUP_KINDS[1:])},
            "http_404": round(self.http_404 * n_base),
            "truncated": round(self.truncated * n_base),
            "not_image": round(self.not_image * n_base),
            "bomb": self.bomb,
            "oversized": self.oversized,
        }


@dataclass
class Row:
    """One pool row while the pool is being built. `file` is relative to www/ (None: nothing served)."""

    source: str
    source_id: str
    original_text: str
    text: str
    url_path: str                  # path part of the URL, relative to the base URL
    file: str | None
    noise: str = "none"
    duplicate_of: int | None = None   # index of the original row
    expected_status: str = SUCCESS
    translations: dict[str, str] = field(default_factory=dict, repr=False)
    meta: dict = field(default_factory=dict, repr=False)   # large pool: package, version, license, concept


def file_id(seed: int, *parts: object) -> str:
    """An opaque, deterministic file id (never derived from untrusted names directly)."""
    h = hashlib.blake2b("\x1f".join(map(str, (seed,) + parts)).encode("utf-8"), digest_size=8)
    return h.hexdigest()


# ------------------------------------------------------------------ bytes of broken / derived files

def png_bomb(width: int, height: int) -> bytes:
    """A small, valid-looking PNG whose header declares width*height RGB pixels.

    Only a few rows of (zero) pixel data follow: a decoder without a pixel cap allocates
    width*height*3 bytes before noticing, which is what a decompression bomb does to a downloader.
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * ((1 + 3 * width) * 4), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def oversized_png(n_bytes: int, rng: np.random.Generator) -> bytes:
    """A real, decodable PNG of about `n_bytes` (random pixels do not compress)."""
    side = int((n_bytes / 3) ** 0.5)
    pixels = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "PNG", compress_level=1)
    return out.getvalue()


def not_image_bytes(rng: random.Random) -> bytes:
    """What servers really send instead of an image: an HTML page, a JSON error, or garbage."""
    kind = rng.choice(("html", "json", "garbage"))
    if kind == "html":
        return (b"<!DOCTYPE html>\n<html><head><title>Access denied</title></head>"
                b"<body><h1>403 Forbidden</h1><p>Hotlinking is not allowed.</p></body></html>\n")
    if kind == "json":
        return b'{"error": "image not available", "code": 410}\n'
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(200, 4000)))


def truncate(data: bytes, rng: random.Random) -> bytes:
    """The first 30-70% of a file, as an interrupted transfer leaves it."""
    return data[: max(16, int(len(data) * rng.uniform(0.3, 0.7)))]


def _flatten(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    return im.convert("RGB")


def near_duplicate(data: bytes, kind: str, rng: random.Random) -> tuple[bytes, str]:
    """A re-encoded, resized or slightly cropped copy of an image. Returns (bytes, extension)."""
    im = Image.open(io.BytesIO(data))
    im.load()
    fmt = "JPEG" if im.format == "JPEG" else "PNG"
    if kind == "near_dup_reencode":
        im, fmt = _flatten(im), "JPEG"
        quality = rng.randint(35, 70)
    elif kind == "near_dup_resize":
        s = rng.uniform(0.5, 0.85)
        im = im.resize((max(8, round(im.width * s)), max(8, round(im.height * s))), Image.Resampling.LANCZOS)
        quality = 85
    elif kind == "near_dup_crop":
        w, h = im.size
        left, top = round(w * rng.uniform(0.02, 0.08)), round(h * rng.uniform(0.02, 0.08))
        right, bottom = w - round(w * rng.uniform(0.02, 0.08)), h - round(h * rng.uniform(0.02, 0.08))
        im = im.crop((left, top, max(left + 4, right), max(top + 4, bottom)))
        quality = 85
    else:
        raise ValueError(kind)
    out = io.BytesIO()
    if fmt == "JPEG":
        _flatten(im).save(out, "JPEG", quality=quality)
        return out.getvalue(), "jpg"
    im.save(out, "PNG")
    return out.getvalue(), "png"


# ------------------------------------------------------------------ assignment

def inject(rows: list[Row], cfg: NoiseConfig, seed: int, read_file, write_file) -> list[Row]:
    """Apply the configured noise to clean base `rows` (modified in place); return rows + added rows.

    `read_file(rel) -> bytes` reads a file already written under www/; `write_file(rel, bytes)`
    writes a new one. Every choice comes from generators seeded by `seed`.
    """
    rng = random.Random(f"{seed}:noise")
    n_base = len(rows)
    # Rows that already carry a (large-pool web) noise kind keep it: one kind per row. In the
    # small/full builds every row starts as "none", so these filters select what they always did.
    translatable = [i for i, r in enumerate(rows)
                    if r.source == "tuxpaint" and r.translations and r.noise == "none"]
    plan = cfg.planned(n_base, len(translatable))

    # modified rows: disjoint sets; non_english first since only Tux Paint rows have translations
    used: set[int] = set()
    for i in rng.sample(translatable, plan["non_english"]):
        r = rows[i]
        lang = rng.choice(sorted(r.translations))
        r.text, r.noise = r.translations[lang], "non_english"
        used.add(i)
    free = [i for i in range(n_base) if i not in used and rows[i].noise == "none"]
    rng.shuffle(free)
    k_swap, k_empty, k_redirect = plan["caption_swap"], plan["empty_caption"], plan["redirect"]
    if k_swap + k_empty + k_redirect > len(free):
        raise ValueError("noise fractions add up to more than the pool")
    swap = free[:k_swap]
    texts = [rows[i].text for i in swap]
    for j, i in enumerate(swap):  # rotate captions within the chosen set: every one moves to another image
        rows[i].text, rows[i].noise = texts[(j + 1) % len(swap)], "caption_swap"
    for i in free[k_swap:k_swap + k_empty]:
        rows[i].text, rows[i].noise = "", "empty_caption"
    for i in free[k_swap + k_empty:k_swap + k_empty + k_redirect]:
        hops = rng.randint(1, cfg.max_redirect_hops)
        rows[i].url_path, rows[i].noise = f"_redirect/{hops}/{rows[i].file}", "redirect"

    clean = [i for i in range(n_base) if rows[i].noise == "none"]
    added: list[Row] = []

    def new_row(kind: str, orig: Row, file: str | None, status: str, dup_of: int | None) -> Row:
        url = file if file is not None else f"{orig.source}/{file_id(seed, kind, len(added))}.jpg"
        return Row(orig.source, orig.source_id, orig.original_text, orig.text, url, file, kind, dup_of, status,
                   meta=orig.meta)

    # duplicates of clean rows
    n_dups = plan["exact_dup"] + sum(plan[k] for k in DUP_KINDS[1:])
    originals = rng.sample(clean, min(n_dups, len(clean)))
    kinds = [k for k in DUP_KINDS for _ in range(plan[k])]
    for kind, i in zip(kinds, originals):
        orig = rows[i]
        data = read_file(orig.file)
        if kind == "exact_dup":
            ext = orig.file.rsplit(".", 1)[1]
        else:
            data, ext = near_duplicate(data, kind, rng)
        rel = f"{orig.source}/{file_id(seed, kind, i)}.{ext}"
        write_file(rel, data)
        added.append(new_row(kind, orig, rel, SUCCESS, i))

    # broken rows: real captions from the pool, broken bytes
    nprng = np.random.default_rng(rng.getrandbits(64))
    for kind in BROKEN_KINDS:
        for j in range(plan[kind]):
            orig = rows[rng.choice(clean)]
            if kind == "http_404":
                added.append(new_row(kind, orig, None, HTTP_404, None))
                continue
            if kind == "truncated":
                data, ext = truncate(read_file(orig.file), rng), orig.file.rsplit(".", 1)[1]
                status = TRUNCATED
            elif kind == "not_image":
                data, ext, status = not_image_bytes(rng), "jpg", NOT_IMAGE
            elif kind == "bomb":
                side = rng.choice((50_000, 80_000, 100_000))
                data, ext, status = png_bomb(side, side), "png", BOMB
            else:
                data, ext, status = oversized_png(cfg.oversized_bytes, nprng), "png", OVERSIZED
            rel = f"{orig.source}/{file_id(seed, kind, j)}.{ext}"
            write_file(rel, data)
            added.append(new_row(kind, orig, rel, status, None))
    return rows + added
