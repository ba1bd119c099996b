"""Write a pool in exactly the format DataComp releases its CommonPool metadata, at any size, fast.

DataComp's ``download_upstream.py --download_npz`` leaves one pair per metadata shard::

    METADATA_DIR/<stem>.parquet   uid, url, text, original_width, original_height,
                                  clip_b32_similarity_score, clip_l14_similarity_score, face_bboxes, sha256
    METADATA_DIR/<stem>.npz       b32_img, b32_txt (n, 512), l14_img, l14_txt (n, 768), row-aligned

Types as published: uid/url/text/sha256 strings (uid = 32 lowercase hex), sizes int64, scores float32,
face_bboxes list<list<float64>> of relative [x1, y1, x2, y2] boxes (often empty), embeddings
float16 L2-normalised, stored uncompressed (``np.savez``). The small pool is 12.8M rows in 26 files
(stems are 32-hex names there; here ``0000000000``... so the order is readable).

The scores are the real cosine of the row's image and text embeddings when embeddings are
written (so a test can recompute them), otherwise drawn around DataComp's distribution. Files are
written one at a time, vectorised (12.8M rows without embeddings take well under a minute).

    files = write_datacomp_pool(dir, n_rows=2000, n_files=3, seed=0)          # full dims
    write_datacomp_pool(dir, n_rows=12_800_000, n_files=26, dims={"b32": 2, "l14": 2})  # bench
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

PARQUET_SCHEMA = pa.schema([
    ("uid", pa.string()), ("url", pa.string()), ("text", pa.string()),
    ("original_width", pa.int64()), ("original_height", pa.int64()),
    ("clip_b32_similarity_score", pa.float32()), ("clip_l14_similarity_score", pa.float32()),
    ("face_bboxes", pa.list_(pa.list_(pa.float64()))), ("sha256", pa.string()),
])
NPZ_KEYS = ("b32_img", "b32_txt", "l14_img", "l14_txt")
PUBLISHED_DIMS = {"b32": 512, "l14": 768}

WORDS = np.array("""a the dog cat bird horse car truck boat tree flower house bridge river mountain beach sky
city park kitchen table chair book phone camera guitar shoe hat shirt dress bag cup apple bread cake pizza
red blue green yellow black white small large old new happy running sitting with on in at of photo
vintage wooden modern stock image design logo vector illustration sale free""".split())
_HEX = np.array([f"{i:02x}".encode() for i in range(256)], dtype="S2")


def _uids(rng: np.random.Generator, n: int) -> pa.Array:
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    hexed = _HEX[raw].view(np.uint8).reshape(n, 32)  # (n, 16) x 2 chars -> (n, 32) bytes, no Python loop
    offsets = np.arange(0, 32 * (n + 1), 32, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(hexed.tobytes()))


def _captions(rng: np.random.Generator, n: int) -> pa.Array:
    lengths = rng.integers(1, 12, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    words = pa.array(WORDS[rng.integers(0, len(WORDS), size=int(offsets[-1]))])
    lists = pa.ListArray.from_arrays(pa.array(offsets), words)
    return pc.binary_join(lists, " ")


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _pair(rng: np.random.Generator, n: int, d: int, mean: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image and text embeddings (float16, unit norm) whose cosine scatters around `mean`."""
    img = _unit(rng, n, d)
    noise = _unit(rng, n, d)
    a = np.clip(rng.normal(mean, 0.06, size=(n, 1)), 0.0, 0.95).astype(np.float32)
    txt = a * img + np.sqrt(1 - a * a) * noise
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    img16, txt16 = img.astype(np.float16), txt.astype(np.float16)
    score = (img16.astype(np.float32) * txt16.astype(np.float32)).sum(axis=1)
    return img16, txt16, score.astype(np.float32)


def _bboxes(rng: np.random.Generator, n: int, face_rate: float) -> pa.Array:
    """Relative [x1, y1, x2, y2] face boxes: none for most rows, 1-3 for about `face_rate` of them."""
    counts = np.where(rng.random(n) < face_rate, rng.integers(1, 4, size=n), 0)
    total = int(counts.sum())
    x1 = rng.uniform(0, 0.7, total)
    y1 = rng.uniform(0, 0.7, total)
    box = np.stack([x1, y1, x1 + rng.uniform(0.05, 0.3, total), y1 + rng.uniform(0.05, 0.3, total)], axis=1)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(box.ravel(), pa.float64()), 4).cast(pa.list_(pa.float64()))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def write_datacomp_file(directory: str | Path, stem: str, n: int, seed: int, dims: dict[str, int] | None = None,
                        npz: bool = True, face_rate: float = 0.1, row_group_size: int = 100_000) -> Path:
    """One parquet (+ npz) pair of `n` rows. Returns the parquet path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dims = dims or PUBLISHED_DIMS
    rng = np.random.default_rng(seed)
    uid = _uids(rng, n)
    url = pc.binary_join_element_wise("https://img.example.com/", uid, ".jpg", "")
    w = np.clip(rng.lognormal(np.log(400), 0.6, n), 16, 8000).astype(np.int64)
    h = np.clip(w * rng.lognormal(0, 0.35, n), 16, 8000).astype(np.int64)
    arrays: dict[str, np.ndarray] = {}
    scores = {}
    for model, mean in (("b32", 0.31), ("l14", 0.27)):
        if npz:
            img, txt, scores[model] = _pair(rng, n, dims[model], mean)
            arrays[f"{model}_img"], arrays[f"{model}_txt"] = img, txt
        else:
            scores[model] = rng.normal(mean, 0.05, n).astype(np.float32)
    sha = pc.utf8_slice_codeunits(pc.binary_join_element_wise(uid, uid, ""), 0, 64)  # 64 hex chars, unique
    table = pa.table({
        "uid": uid, "url": url, "text": _captions(rng, n), "original_width": w, "original_height": h,
        "clip_b32_similarity_score": scores["b32"], "clip_l14_similarity_score": scores["l14"],
        "face_bboxes": _bboxes(rng, n, face_rate), "sha256": sha,
    }, schema=PARQUET_SCHEMA)
    path = directory / f"{stem}.parquet"
    pq.write_table(table, path, row_group_size=row_group_size)
    if npz:
        np.savez(directory / f"{stem}.npz", **arrays)
    return path


def write_datacomp_pool(directory: str | Path, n_rows: int, n_files: int = 26, seed: int = 0,
                        dims: dict[str, int] | None = None, npz: bool = True, face_rate: float = 0.1) -> list[Path]:
    """`n_rows` rows split evenly over `n_files` parquet/npz pairs named 0000000000, 0000000001, ..."""
    sizes = [n_rows // n_files + (1 if i < n_rows % n_files else 0) for i in range(n_files)]
    return [write_datacomp_file(directory, f"{i:010d}", n, seed=seed * 100_003 + i, dims=dims, npz=npz,
                                face_rate=face_rate) for i, n in enumerate(sizes)]
