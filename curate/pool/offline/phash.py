"""The perceptual near-copy rule of the large pool's zero-shot guarantee.

The concept key (concepts.py) cannot see synonyms: "zoom out" and "magnifying glass minus" are the
same magnifier glyph under two names, and an icon set's "selector" is another set's "brackets
vertical". So after rendering, every pool image is compared with every in-domain evaluation image
by a 256-bit DCT perceptual hash (`dhash` below), and a pool image within NEAR_COPY_BITS bits of
one is dropped from the pool. Most resized and re-encoded copies of an image land within it
(tests/pool/test_offline_large.py checks that on the pool's own near duplicates); distinct pictures
rarely do: in the large build it drops about 1% of the pool. It is deliberately coarse: a different concept
drawn almost the same way (a purple circle for a held-out orange one) is dropped too, which only
removes more from the pool. Style-shift sets are exempt by design (their concepts are in the pool,
in other styles), but no pool file may equal any evaluation image byte for byte.
"""

from __future__ import annotations

import io

import numpy as np

NEAR_COPY_BITS = 24   # of 256
HASH_SIDE = 16        # the 16 x 16 lowest DCT frequencies
DCT_SIDE = 64         # of the grey image resized to 64 x 64


def dhash(data: bytes, n: int = HASH_SIDE) -> np.ndarray:
    """256-bit DCT perceptual hash of encoded image bytes, as 32 uint8 (numpy packbits order).

    The image is composited on white, made grey, resized to 64 x 64; bit k says whether the k-th of
    the 16 x 16 lowest 2-D DCT-II coefficients is above their median (DC excluded from the median).
    (Named dhash for history; a gradient dHash collapsed on near-blank clip art, this does not.)
    """
    from PIL import Image
    from scipy.fft import dctn

    with Image.open(io.BytesIO(data)) as im:
        rgba = im.convert("RGBA")
    flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    flat.alpha_composite(rgba)
    grey = flat.convert("L").resize((DCT_SIDE, DCT_SIDE), Image.Resampling.BILINEAR)
    coeffs = dctn(np.asarray(grey, dtype=np.float64), type=2, norm="ortho")[:n, :n].reshape(-1)
    return np.packbits(coeffs > np.median(coeffs[1:]))


def dhash_files(paths: list[str]) -> np.ndarray:
    """dhash of each file (a worker entry: a list of paths in, an (n, 32) uint8 array out)."""
    from pathlib import Path

    return np.stack([dhash(Path(p).read_bytes()) for p in paths]) if paths else np.zeros((0, 32), np.uint8)


def nearest_bits(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    """For each query hash, the Hamming distance (bits) to its nearest database hash (faiss, exact)."""
    import faiss

    if len(database) == 0 or len(queries) == 0:
        return np.full(len(queries), 256, dtype=np.int64)
    index = faiss.IndexBinaryFlat(8 * database.shape[1])
    index.add(np.ascontiguousarray(database, dtype=np.uint8))
    dist, _ = index.search(np.ascontiguousarray(queries, dtype=np.uint8), 1)
    return dist[:, 0].astype(np.int64)
