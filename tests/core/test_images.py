"""curate.core.images.decode_image's optional JPEG draft decode: reduced only where it is safe, capped as before."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from curate.core.images import ImageDecodeError, decode_image


def _encode(size: tuple[int, int], fmt: str, mode: str = "RGB") -> bytes:
    img = Image.new(mode, size)
    for x in range(0, size[0], 7):  # some structure, so the codec has something to scale
        for y in range(0, size[1], 5):
            img.putpixel((x, y), (x % 256, y % 256, 99) if mode == "RGB" else x % 256)
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90) if fmt == "JPEG" else img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("size, side, want", [
    ((256, 192), 64, (128, 96)),   # min(256 // 64, 192 // 64) = 3 -> scale 1/2: both sides stay >= 64
    ((512, 512), 64, (64, 64)),    # 1/8
    ((512, 640), 224, (256, 320)),  # ViT-B-32's 224: 1/2
    ((100, 300), 64, (100, 300)),  # shortest side under 2 x 64: full size
])
def test_jpeg_draft_reduces_only_while_both_sides_stay_at_least_the_side(size, side, want):
    img = decode_image(_encode(size, "JPEG"), draft_size=side)
    assert img.size == want and img.mode == "RGB"
    assert min(img.size) >= side or img.size == size
    assert decode_image(_encode(size, "JPEG")).size == size  # without draft_size: full size, as before


def test_non_jpeg_and_grayscale_jpeg_still_decode():
    png = decode_image(_encode((300, 300), "PNG"), draft_size=64)
    assert png.size == (300, 300) and png.mode == "RGB"  # draft is JPEG-only: other formats decode in full
    gray = decode_image(_encode((256, 256), "JPEG", mode="L"), draft_size=64)
    assert gray.size == (64, 64) and gray.mode == "RGB"


def test_pixel_cap_applies_to_the_full_size_before_any_draft():
    data = _encode((400, 400), "JPEG")
    with pytest.raises(ImageDecodeError, match="400x400 pixels, over the cap"):
        decode_image(data, max_pixels=400 * 399, draft_size=50)  # the drafted 50x50 would be under the cap
    with pytest.raises(ImageDecodeError, match="undecodable image"):
        decode_image(data[:200], draft_size=50)
