"""The one decoder for untrusted image bytes, with a per-call decompression-bomb cap.

Every stage that decodes an image it did not render itself (pool samples in embed, the filter's report
and target images, evaluation sets, training data, decontamination's evaluation images) calls
`decode_image`. The cap is an argument, never PIL's process-wide ``Image.MAX_IMAGE_PIXELS``: a global set
by one stage silently changes every other stage in the same process (and Ray worker), and a library that
resets it would lift the cap without a word. The size is read from the header, before any pixel is
decoded, so a bomb costs nothing; PIL's own DecompressionBombError (raised at twice its global) is still
caught and reported as a reason.

Lives in curate.core (not curate.pool) because filters/ may import only curate.core, curate.clip and
curate.lib; curate.pool.io re-exports it for the pool's readers.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb cap (PIL's own default warns at 89M)


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image (the message is the reason recorded in outputs)."""


def decode_image(data: bytes | None, max_pixels: int = MAX_IMAGE_PIXELS, draft_size: int | None = None):
    """Bytes -> RGB PIL image, or ImageDecodeError whose message is a short, recordable reason.

    `draft_size` S (optional) lets a JPEG decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, PIL's
    ``Image.draft``) when both sides stay >= S at that scale; other formats, and JPEGs under 2S on a side,
    decode in full. The result is not the full-size image, so pass it only when the caller shrinks the
    image to a shortest side <= S next anyway (a CLIP eval transform: resize shortest side to S, center
    crop): then the decoded image is still at least as large as what the resize produces, the resize only
    ever shrinks, the geometry is the same up to rounding of the reduced size (ceil(side / scale)), and
    only the pixel filter differs (DCT scaling + the resize instead of the resize alone). That costs up to
    4x less CPU for the decode and, mostly, the resize of a large image; how far the embeddings move is
    measured in perf/RESULTS.md ("Embedding vs the pipeline limit"). The pixel cap applies to the full
    size in the header, before anything is decoded.
    """
    from PIL import Image

    if not data:
        raise ImageDecodeError("no image bytes in shard")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise ImageDecodeError(f"image is {w}x{h} pixels, over the cap of {max_pixels}")
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))  # a no-op unless both sides are >= 2 * draft_size
        img.load()
        return img.convert("RGB")
    except ImageDecodeError:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
        # PIL puts the buffer's memory address in some messages; drop it so reruns write identical files.
        why = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
        raise ImageDecodeError(f"undecodable image: {type(e).__name__}: {why}") from None


def decode_image_file(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS, max_bytes: int | None = None):
    """`decode_image` of a file's bytes; a file over `max_bytes` is refused before it is read."""
    p = Path(path)
    try:
        if max_bytes is not None and p.stat().st_size > max_bytes:
            raise ImageDecodeError(f"image file is {p.stat().st_size} bytes (cap {max_bytes})")
        data = p.read_bytes()
    except OSError as e:
        raise ImageDecodeError(f"cannot read image file: {e.strerror or e}") from None
    return decode_image(data, max_pixels)
