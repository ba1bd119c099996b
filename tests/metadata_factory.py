"""Generate a pool's metadata and embeddings parquet (docs/FORMATS.md, "Pool metadata", "Embeddings") without images, fast.

Used by the filter tests (small, hand-checkable pools) and by perf/bench_filter.py (12.8M rows, the
DataComp small-pool size, in ~26 files). Everything is vectorised with numpy/pyarrow so that 12.8M
rows take well under a minute: uids are random 128-bit hex built straight into an Arrow string
buffer, captions are Arrow lists of vocabulary words joined with `binary_join`.

    meta = write_metadata(pool, n_rows=1000, n_files=4, seed=0)          # POOL/metadata/*.parquet
    write_embeddings(pool, "curate-debug__abc", dim=16, seed=1)         # POOL/embeddings/<id>/*.parquet

Rows: ~8% ``failed_to_download`` and ~2% ``failed_to_resize`` (no sizes, no embeddings), ~20% of
captions drawn from a French/German/Spanish vocabulary, image sizes log-normal around 300 px so the
``basic`` size and aspect rules drop a realistic share. Pass `rows=` to write exact rows instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

METADATA_SCHEMA = pa.schema(
    [
        ("uid", pa.string()), ("url", pa.string()), ("text", pa.string()), ("shard", pa.int64()),
        ("key", pa.string()), ("status", pa.string()), ("error_message", pa.string()),
        ("width", pa.int64()), ("height", pa.int64()), ("original_width", pa.int64()),
        ("original_height", pa.int64()), ("sha256", pa.string()),
    ]
)

ENGLISH = """dog cat bird horse cow sheep car truck bus bicycle boat airplane train tree flower
house building bridge river lake mountain beach ocean sky cloud sun moon star road street city
park garden kitchen table chair sofa bed lamp window door wall floor book pen phone computer
camera guitar piano drum ball shoe hat shirt dress coat bag cup plate bowl bottle glass apple
banana orange bread cake pizza cheese egg fish chicken rice soup tea coffee red blue green
yellow black white small large old new happy running sitting standing flying playing with on
in at near the a of and under over beautiful vintage modern wooden metal stone snow rain
summer winter autumn spring morning night girl boy man woman child family friends team player
game field forest desert island castle church tower market shop festival wedding portrait
landscape sunset sunrise close up view photo of an""".split()
FOREIGN = """le la les un une des chien chat maison voiture arbre fleur avec dans sur sous pour
der die das ein eine hund katze haus auto baum blume mit und auf unter fur el los una perro gato
casa coche flor con en sobre bajo para muy hermoso grande pequeno rojo azul verde noche tag
jour dia""".split()


def _hex_uids(rng: np.random.Generator, n: int) -> pa.Array:
    """n random 32-hex-char strings as one Arrow StringArray (no per-row Python objects)."""
    data = rng.bytes(16 * n).hex().encode("ascii")
    offsets = np.arange(0, 32 * n + 1, 32, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data))


def _captions(rng: np.random.Generator, n: int, foreign_fraction: float) -> pa.Array:
    lengths = rng.integers(1, 13, size=n)
    foreign = rng.random(n) < foreign_fraction
    total = int(lengths.sum())
    row_of_word = np.repeat(np.arange(n), lengths)
    en_words = pa.array(ENGLISH)
    fr_words = pa.array(FOREIGN)
    words = pa.concat_arrays([en_words, fr_words])
    idx = np.where(
        foreign[row_of_word],
        len(ENGLISH) + rng.integers(0, len(FOREIGN), size=total),
        rng.integers(0, len(ENGLISH), size=total),
    )
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    lists = pa.ListArray.from_arrays(pa.array(offsets), words.take(pa.array(idx)))
    return pc.binary_join(lists, " ")


def generate_metadata(
    n_rows: int, n_files: int = 1, seed: int = 0, failed_fraction: float = 0.08,
    resize_fraction: float = 0.02, foreign_fraction: float = 0.2,
):
    """Yield metadata tables, one per file, with the contract schema (one file in memory at a time)."""
    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, n_rows, n_files + 1).astype(np.int64)
    for f in range(n_files):
        n = int(bounds[f + 1] - bounds[f])
        uids = _hex_uids(rng, n)
        text = _captions(rng, n, foreign_fraction)
        u = rng.random(n)
        status = np.full(n, "success", dtype=object)
        status[u < failed_fraction] = "failed_to_download"
        status[(u >= failed_fraction) & (u < failed_fraction + resize_fraction)] = "failed_to_resize"
        ok = status == "success"
        ow = np.maximum(1, rng.lognormal(np.log(300), 0.5, n)).astype(np.int64)
        aspect = np.where(rng.random(n) < 0.05, rng.uniform(3.0, 6.0, n), rng.uniform(0.6, 1.8, n))
        oh = np.maximum(1, (ow / aspect)).astype(np.int64)
        key = pc.binary_join_element_wise(
            pa.array(np.full(n, f"{f:05d}", dtype=object)), pc.cast(pa.array(np.arange(n) % 10_000), pa.string()), ""
        )
        url = pc.binary_join_element_wise(pa.array(np.full(n, "http://127.0.0.1:8000/img/", dtype=object)), uids, "")
        err = np.where(status == "failed_to_download", "HTTP Error 404: Not Found",
                       np.where(status == "failed_to_resize", "cannot identify image file", None))
        yield pa.table(
            {
                "uid": uids, "url": url, "text": text,
                "shard": pa.array(np.full(n, f, dtype=np.int64)), "key": key,
                "status": pa.array(status, pa.string()), "error_message": pa.array(err, pa.string()),
                "width": pa.array(np.minimum(ow, 64), mask=~ok), "height": pa.array(np.minimum(oh, 64), mask=~ok),
                "original_width": pa.array(ow, mask=~ok), "original_height": pa.array(oh, mask=~ok),
                "sha256": pa.nulls(n, pa.string()),
            },
            schema=METADATA_SCHEMA,
        )


def write_metadata(pool: str | Path, n_rows: int = 0, n_files: int = 1, seed: int = 0,
                   rows: Sequence[dict] | None = None, **kw) -> pa.Table | None:
    """Write POOL/metadata/NNNNNNNN.parquet; `rows` (dicts, missing fields filled) or generated rows.

    Returns all rows as one table, or None above 1M rows (kept out of memory for the perf bench).
    """
    meta = Path(pool) / "metadata"
    meta.mkdir(parents=True, exist_ok=True)
    if rows is not None:
        full = []
        for i, r in enumerate(rows):
            d = {"uid": None, "url": f"http://example.invalid/{i}.jpg", "text": "", "shard": 0, "key": f"{i:09d}",
                 "status": "success", "error_message": None, "width": 64, "height": 64,
                 "original_width": 256, "original_height": 256, "sha256": None}
            d.update(r)
            full.append(d)
        table = pa.Table.from_pylist(full, schema=METADATA_SCHEMA)
        bounds = np.linspace(0, len(full), n_files + 1).astype(int)
        tables = [table.slice(bounds[f], bounds[f + 1] - bounds[f]) for f in range(n_files)]
    else:
        tables = generate_metadata(n_rows, n_files, seed, **kw)
    kept = []
    for f, t in enumerate(tables):
        pq.write_table(t, meta / f"{f:08d}.parquet")
        if rows is not None or n_rows <= 1_000_000:
            kept.append(t)
    return pa.concat_tables(kept) if kept else None


def embeddings_schema(dim: int) -> pa.Schema:
    vec = pa.list_(pa.float16(), dim)
    return pa.schema([("uid", pa.string()), ("image_emb", vec), ("text_emb", vec),
                      ("clip_score", pa.float32()), ("error", pa.string())])


def _vectors(x: np.ndarray | None, dim: int, valid: np.ndarray) -> pa.Array:
    n = len(valid)
    if x is None:
        return pa.nulls(n, pa.list_(pa.float16(), dim))
    values = pa.array(x.astype(np.float16).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~valid))


def write_embeddings(
    pool: str | Path, model_id: str, dim: int | None = 16, seed: int = 1,
    scores: dict[str, float] | None = None, image_emb: dict[str, np.ndarray] | None = None,
    vectors: bool = True, score_mean: float = 0.25, score_std: float = 0.05,
) -> None:
    """Write POOL/embeddings/<model_id>/ parquet, one file per metadata file, success rows only.

    clip_score is the cosine of the stored vectors when `vectors` (text = image + noise), otherwise
    drawn from N(score_mean, score_std) with null vectors (perf bench: scores only). `scores` /
    `image_emb` override per uid (hand-computed tests). Rows with status != success get no row,
    as with a real embed stage that skips failed downloads.
    """
    pool = Path(pool)
    out = pool / "embeddings" / model_id
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dim = dim or 4
    for path in sorted((pool / "metadata").glob("*.parquet")):
        t = pq.read_table(path, columns=["uid", "status"])
        t = t.filter(pc.equal(t["status"], "success"))
        n = t.num_rows
        uids = t["uid"].to_pylist() if (scores or image_emb) else None
        valid = np.ones(n, dtype=bool)
        if vectors:
            img = rng.standard_normal((n, dim)).astype(np.float32)
            if image_emb:
                for i, u in enumerate(uids):
                    if u in image_emb:
                        img[i] = image_emb[u]
            img /= np.linalg.norm(img, axis=1, keepdims=True)
            txt = img + rng.standard_normal((n, dim)).astype(np.float32) * rng.uniform(0.2, 2.0, (n, 1))
            txt /= np.linalg.norm(txt, axis=1, keepdims=True)
            score = (img * txt).sum(1).astype(np.float32)
        else:
            img = txt = None
            score = rng.normal(score_mean, score_std, n).astype(np.float32)
        if scores:
            for i, u in enumerate(uids):
                if u in scores:
                    score[i] = scores[u]
        table = pa.table(
            {"uid": t["uid"], "image_emb": _vectors(img, dim, valid), "text_emb": _vectors(txt, dim, valid),
             "clip_score": pa.array(score, pa.float32()), "error": pa.nulls(n, pa.string())},
            schema=embeddings_schema(dim),
        )
        meta = {b"model_id": model_id.encode()}
        pq.write_table(table.replace_schema_metadata(meta), out / path.name)
