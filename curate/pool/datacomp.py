"""DataComp's released CommonPool metadata as a curate pool, read in place (no conversion).

`curate pool import-datacomp METADATA_DIR --out POOL` takes the folder DataComp's
``download_upstream.py`` writes (``<stem>.parquet`` with uid, url, text, original_width,
original_height, clip_b32_similarity_score, clip_l14_similarity_score, face_bboxes, sha256; and
``<stem>.npz`` with b32_img, b32_txt, l14_img, l14_txt row-aligned with it) and makes POOL::

    POOL/metadata/00000000.parquet -> METADATA_DIR/<stem 0>.parquet    (symlinks, sorted by stem)
    POOL/embeddings/ViT-B-32__openai/_datacomp_index.parquet            one row per file: npz path, keys,
    POOL/embeddings/ViT-L-14__openai/_datacomp_index.parquet            rows, dim, score column
    POOL/datacomp.json                                                   source, fingerprints, counts (last)

Why read in place rather than import (convert): the small pool's npz files alone are ~65 GB and the
xlarge pool's are terabytes; rewriting them as our embeddings parquet would double the disk and cost
hours for no gain, since DuckDB reads DataComp's parquet directly and an uncompressed npz member is a
plain .npy at a fixed offset that numpy can memory-map. So "import" only validates (columns, npz
keys, row counts, dims, uid format and duplicates), links and indexes; it takes seconds.

How `curate filter` sees it (`meta_view_sql`, `embeddings_view_sql`, `batch_vectors`):
- metadata: every released row is a candidate (status ``success`` in the view: the rows have not
  been downloaded, and DataComp's baselines filter the metadata before any download, so the
  download status does not exist yet; `curate download` of the kept uids records it later).
- embeddings under the model ids of OpenAI ViT-B-32 and ViT-L-14 (`curate.clip.models.model_id(arch,
  "openai")`): ``clip_score`` is DataComp's precomputed similarity column; image/text vectors come
  from the npz, gathered per batch for only the rows and keys a step asks for (memory-mapped when
  the member is stored, which is how ``np.savez`` writes; a deflated member is decompressed one
  file at a time).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import time
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import click
import numpy as np

from curate.core.atomic import atomic_path, write_json
from curate.core.errors import CurateError

log = logging.getLogger(__name__)

FORMAT = "curate-datacomp-pool/1"
DESCRIPTOR = "datacomp.json"
INDEX_FILE = "_datacomp_index.parquet"
REQUIRED_COLUMNS = ("uid", "url", "text", "original_width", "original_height", "clip_b32_similarity_score",
                    "clip_l14_similarity_score", "sha256")
OPTIONAL_COLUMNS = ("face_bboxes",)
# DataComp prefix -> (open_clip architecture, score column). Both are OpenAI's weights.
MODELS = {"b32": ("ViT-B-32", "clip_b32_similarity_score"), "l14": ("ViT-L-14", "clip_l14_similarity_score")}
PUBLISHED_DIMS = {"b32": 512, "l14": 768}
GATHER_ROWS = 65_536  # rows of an npz member converted to float32 at a time (`batch_vectors`)


# ---------------------------------------------------------------- npz members, memory-mapped

@dataclass(frozen=True)
class NpzMember:
    """Where one array of an .npz lives: its shape and dtype, and the byte offset of its data when
    the member is stored uncompressed (None when deflated: it must be decompressed to be read)."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    offset: int | None


def inspect_npz(path: str | os.PathLike) -> dict[str, NpzMember]:
    """Read an .npz's zip directory and each member's .npy header, never the data.

    Written by hand because numpy's ``np.load(npz, mmap_mode="r")`` ignores mmap_mode for npz
    archives (it would read whole arrays); the zip and .npy formats give the data offset directly.
    """
    path = Path(path)
    out: dict[str, NpzMember] = {}
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                key = info.filename[:-4]
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read_header(fh)
                    header_len = fh.tell() if info.compress_type == zipfile.ZIP_STORED else None
                if fortran or dtype.hasobject:
                    raise CurateError(f"{path}: member {key!r} is {'Fortran-ordered' if fortran else 'an object array'};"
                                      " expected a C-ordered numeric array")
                offset = None
                if info.compress_type == zipfile.ZIP_STORED:
                    raw.seek(info.header_offset)
                    local = raw.read(30)
                    if local[:4] != b"PK\x03\x04":
                        raise CurateError(f"{path}: damaged zip local header for member {key!r}")
                    name_len, extra_len = struct.unpack("<HH", local[26:30])
                    offset = info.header_offset + 30 + name_len + extra_len + header_len
                out[key] = NpzMember(key, tuple(int(s) for s in shape), dtype.str, offset)
    except CurateError:
        raise
    except FileNotFoundError:
        raise CurateError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise CurateError(f"{path}: not a readable .npz archive ({type(e).__name__}: {e})") from None
    return out


@lru_cache(maxsize=16)
def _member_array(path: str, key: str, mtime_ns: int) -> np.ndarray:
    """The member as an array: a read-only memmap when stored, else decompressed (cached: one file)."""
    m = inspect_npz(path).get(key)
    if m is None:
        raise CurateError(f"{path}: no array {key!r}")
    if m.offset is not None:
        return np.memmap(path, dtype=np.dtype(m.dtype), mode="r", offset=m.offset, shape=m.shape)
    with np.load(path, allow_pickle=False) as z:
        return z[key]


def member_array(path: str | os.PathLike, key: str) -> np.ndarray:
    return _member_array(str(path), key, os.stat(path).st_mtime_ns)


def batch_vectors(table, kind: str) -> np.ndarray:
    """float32 (n, d) vectors for a filter batch whose rows carry ``_npz_src``, ``_npz_row`` and
    ``_npz_prefix`` (set by `embeddings_view_sql`); `kind` is "img" or "txt". Rows without a
    source get NaN. Reads only these rows of each file's member (sorted, so the memmap is read
    forward)."""
    src = table["_npz_src"].to_numpy(zero_copy_only=False)
    rows = table["_npz_row"].to_numpy(zero_copy_only=False)
    prefix = table["_npz_prefix"].to_numpy(zero_copy_only=False)
    n = len(src)
    out: np.ndarray | None = None
    have = np.array([s is not None for s in src], dtype=bool)
    if not have.any():
        return np.zeros((n, 0), np.float32)
    for s in dict.fromkeys(src[have]):
        sel = np.flatnonzero(src == s)
        key = f"{prefix[sel[0]]}_{kind}"
        arr = member_array(s, key)
        r = rows[sel].astype(np.int64)
        if len(r) and (r.max() >= arr.shape[0] or r.min() < 0):
            raise CurateError(f"{s}: row {int(r.max())} requested but {key!r} has {arr.shape[0]} rows")
        order = np.argsort(r, kind="stable")
        if out is None:
            out = np.full((n, arr.shape[1]), np.nan, np.float32)
        # a chunk of rows at a time: float16 -> float32 on assignment, no file-sized temporaries (issue 20)
        for c in range(0, len(order), GATHER_ROWS):
            o = order[c:c + GATHER_ROWS]
            out[sel[o]] = arr[r[o]]
        # the member's pages stay in the page cache; drop them from this process's RSS once read (1 GiB per
        # 1M x 512 float16). numpy's memmap keeps its mmap as `_mmap`; no madvise on Windows.
        mm = getattr(arr, "_mmap", None)
        if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)
    return out


# ---------------------------------------------------------------- the pool descriptor

def is_datacomp_pool(pool: str | os.PathLike) -> bool:
    return (Path(pool) / DESCRIPTOR).is_file()


def read_descriptor(pool: str | os.PathLike) -> dict[str, Any]:
    p = Path(pool) / DESCRIPTOR
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise CurateError(f"{p}: unreadable ({e}); re-run `curate pool import-datacomp`") from None
    if d.get("format") != FORMAT:
        raise CurateError(f"{p}: format {d.get('format')!r}, expected {FORMAT!r}")
    return d


def _sql_str(s: str | os.PathLike) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def _meta_columns(pool: str | os.PathLike, alias: str = "") -> str:
    a = f"{alias}." if alias else ""
    bbox = f", {a}face_bboxes" if read_descriptor(pool).get("has_face_bboxes") else ""
    return (f"{a}uid AS uid, {a}url AS url, {a}text AS text, NULL::INTEGER AS shard, NULL::VARCHAR AS key, "
            f"'success' AS status, NULL::VARCHAR AS error_message, NULL::INTEGER AS width, NULL::INTEGER AS height, "
            f"{a}original_width::INTEGER AS original_width, {a}original_height::INTEGER AS original_height, "
            f"{a}sha256 AS sha256{bbox}, {a}clip_b32_similarity_score AS clip_b32_similarity_score, "
            f"{a}clip_l14_similarity_score AS clip_l14_similarity_score")


def meta_view_sql(pool: str | os.PathLike) -> str:
    """SELECT giving the released metadata the pool metadata schema (docs/FORMATS.md, "Pool metadata").

    shard/key/width/height/error_message are NULL (nothing downloaded yet); status is 'success' so
    every released row is a candidate, as in DataComp's baselines."""
    glob = Path(pool) / "metadata" / "*.parquet"
    return f"SELECT {_meta_columns(pool)} FROM read_parquet({_sql_str(glob)})"


def embeddings_view_sql(pool: str | os.PathLike, model_id: str) -> str | None:
    """SELECT for a model id backed by DataComp's files (None if `model_id` is not one of them).

    Row for row the metadata view plus clip_score (DataComp's precomputed column, its own type: no rounding) and
    where each row's vectors are (_npz_src, _npz_row, _npz_prefix), so the runner uses it in place
    of the metadata instead of joining the two on uid (a 12.8M-row hash join saved)."""
    index = Path(pool) / "embeddings" / model_id / INDEX_FILE
    if not is_datacomp_pool(pool) or not index.is_file():
        return None
    import pyarrow.parquet as pq

    idx = pq.read_table(index)
    score_col = idx["score_column"][0].as_py()
    prefix = idx["prefix"][0].as_py()
    glob = Path(pool) / "metadata" / "*.parquet"
    return (f"SELECT {_meta_columns(pool, 'p')}, p.{score_col} AS clip_score, i.npz AS _npz_src, "
            f"p.file_row_number AS _npz_row, {_sql_str(prefix)} AS _npz_prefix "
            f"FROM read_parquet({_sql_str(glob)}, filename=true, file_row_number=true) p "
            f"LEFT JOIN read_parquet({_sql_str(index)}) i "
            f"ON i.file_index = regexp_extract(p.filename, '(\\d+)\\.parquet$', 1)::INTEGER")


# ---------------------------------------------------------------- import

@dataclass
class ImportConfig:
    """`import_datacomp` inputs. `check_uids` scans every uid (format, duplicates): a few seconds per
    10M rows with DuckDB, worth it once since every later stage trusts them."""

    metadata_dir: Path
    out: Path
    check_uids: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.metadata_dir, self.out = Path(self.metadata_dir), Path(self.out)


def file_fingerprint(path: Path) -> dict[str, Any]:
    """Size and mtime of a source file: enough to see that DataComp's parquet or npz changed since import."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _check_pair(parquet: Path, dims: dict[str, int]) -> dict[str, Any]:
    """Validate one parquet/npz pair; return its entry for the descriptor."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(parquet)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise CurateError(f"{parquet}: cannot read parquet footer ({e})") from None
    names = pf.schema_arrow.names
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise CurateError(f"{parquet}: missing DataComp column(s) {missing} (has {names})")
    rows = pf.metadata.num_rows
    entry: dict[str, Any] = {"stem": parquet.stem, "parquet": str(parquet.resolve()), "rows": rows,
                             "face_bboxes": "face_bboxes" in names, "parquet_fp": file_fingerprint(parquet)}
    npz = parquet.with_suffix(".npz")
    if not npz.is_file():
        entry["npz"] = None
        return entry
    members = inspect_npz(npz)
    for prefix in MODELS:
        for kind in ("img", "txt"):
            key = f"{prefix}_{kind}"
            m = members.get(key)
            if m is None:
                raise CurateError(f"{npz}: no array {key!r} (has {sorted(members)}); DataComp's npz holds "
                                  f"b32_img, b32_txt, l14_img, l14_txt")
            if len(m.shape) != 2 or m.shape[0] != rows:
                raise CurateError(f"{npz}: {key!r} has shape {m.shape}, expected ({rows}, d): one row per row of "
                                  f"{parquet.name}")
            if np.dtype(m.dtype).kind != "f":
                raise CurateError(f"{npz}: {key!r} has dtype {m.dtype}, expected floating point")
            d = dims.setdefault(prefix, m.shape[1])
            if m.shape[1] != d:
                raise CurateError(f"{npz}: {key!r} has {m.shape[1]} dims, other files have {d}")
    entry["npz"] = str(npz.resolve())
    entry["npz_fp"] = file_fingerprint(npz)
    entry["npz_stored"] = all(members[f"{p}_{k}"].offset is not None for p in MODELS for k in ("img", "txt"))
    return entry


def _check_uids(files: list[Path]) -> dict[str, int]:
    import duckdb

    con = duckdb.connect()
    lst = "[" + ", ".join(_sql_str(f) for f in files) + "]"
    bad = con.execute(f"SELECT uid, filename, file_row_number FROM read_parquet({lst}, filename=true, "
                      f"file_row_number=true) WHERE uid IS NULL OR NOT regexp_full_match(uid, '[0-9a-f]{{32}}') "
                      f"LIMIT 1").fetchall()
    if bad:
        u, f, r = bad[0]
        raise CurateError(f"{f}: row {r} has uid {u!r}, expected 32 lowercase hex characters")
    total, distinct = con.execute(f"SELECT count(*), count(DISTINCT uid) FROM read_parquet({lst})").fetchone()
    return {"rows": int(total), "duplicate_uids": int(total - distinct)}


def import_datacomp(cfg: ImportConfig) -> dict[str, Any]:
    """Validate METADATA_DIR and make OUT a pool that reads it in place. Idempotent."""
    import pyarrow as pa

    from curate.clip.models import model_id

    src = cfg.metadata_dir
    # rglob: the xlarge pool comes as <scale>/<part>/*.parquet; the others are flat.
    files = sorted(src.rglob("*.parquet"), key=lambda f: f.relative_to(src).parts) if src.is_dir() else []
    if not files:
        raise CurateError(f"{src}: no .parquet files (expected DataComp's metadata folder: <stem>.parquet + <stem>.npz)")
    out = cfg.out
    desc_path = out / DESCRIPTOR
    fps = [[str(f.relative_to(src)), file_fingerprint(f), file_fingerprint(f.with_suffix(".npz")) if f.with_suffix(".npz").exists() else None]
           for f in files]
    if desc_path.exists() and not cfg.overwrite:
        old = read_descriptor(out)
        if old.get("source") == str(src.resolve()) and old.get("source_fingerprints") == fps:
            click.echo(f"{out}: already up to date ({old['rows']} rows from {len(files)} files); nothing written")
            return {**old["summary"], "up_to_date": True}
    if (out / "metadata").exists() and not desc_path.exists() and any((out / "metadata").iterdir()) and not cfg.overwrite:
        raise CurateError(f"{out}: has a metadata/ folder that is not a DataComp import; choose another --out "
                          f"or pass --overwrite")
    t0 = time.time()
    dims: dict[str, int] = {}
    entries = [_check_pair(f, dims) for f in files]
    with_npz = [e for e in entries if e["npz"]]
    if with_npz and len(with_npz) != len(entries):
        lacking = [e["stem"] for e in entries if not e["npz"]]
        raise CurateError(f"{src}: {len(lacking)} parquet file(s) have no .npz beside them (e.g. {lacking[0]}.npz); "
                          f"download them all (download_upstream.py --download_npz) or none")
    uid_stats = _check_uids(files) if cfg.check_uids else {"rows": sum(e["rows"] for e in entries),
                                                            "duplicate_uids": None}
    if uid_stats["duplicate_uids"]:
        log.warning("%s: %d duplicate uids (kept; a duplicate means upsampling downstream)", src,
                    uid_stats["duplicate_uids"])

    if cfg.overwrite and desc_path.exists():
        desc_path.unlink()
    meta_dir = out / "metadata"
    meta_dir.mkdir(parents=True, exist_ok=True)
    for old in meta_dir.glob("*.parquet"):
        if old.is_symlink():
            old.unlink()
    for i, e in enumerate(entries):
        link = meta_dir / f"{i:08d}.parquet"
        tmp = meta_dir / f".{i:08d}.parquet.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(e["parquet"], tmp)
        os.replace(tmp, link)

    models = {}
    for prefix, (arch, score_col) in MODELS.items():
        mid = model_id(arch, "openai")
        d = out / "embeddings" / mid
        d.mkdir(parents=True, exist_ok=True)
        idx = pa.table({
            "file_index": pa.array(range(len(entries)), pa.int32()),
            "stem": [e["stem"] for e in entries], "parquet": [e["parquet"] for e in entries],
            "npz": pa.array([e["npz"] for e in entries], pa.string()),
            "rows": pa.array([e["rows"] for e in entries], pa.int64()),
            "prefix": [prefix] * len(entries), "score_column": [score_col] * len(entries),
            "dim": pa.array([dims.get(prefix)] * len(entries), pa.int32()),
        }).replace_schema_metadata({"model_id": mid, "source": "datacomp", "image_key": f"{prefix}_img",
                                    "text_key": f"{prefix}_txt"})
        import pyarrow.parquet as pq

        with atomic_path(d / INDEX_FILE, suffix=".parquet") as tmp:
            pq.write_table(idx, tmp)
        models[mid] = {"arch": arch, "pretrained": "openai", "score_column": score_col,
                       "image_key": f"{prefix}_img" if with_npz else None, "text_key": f"{prefix}_txt" if with_npz else None,
                       "dim": dims.get(prefix)}
    rows = sum(e["rows"] for e in entries)
    summary = {"out": str(out), "source": str(src.resolve()), "files": len(entries), "rows": rows,
               "duplicate_uids": uid_stats["duplicate_uids"], "embeddings": bool(with_npz), "models": sorted(models),
               "dims": dims, "seconds": round(time.time() - t0, 3), "up_to_date": False}
    if with_npz and not all(e["npz_stored"] for e in entries):
        log.warning("%s: some npz members are compressed; steps reading vectors will decompress one file at a time", src)
    write_json(desc_path, {"format": FORMAT, "source": str(src.resolve()), "source_fingerprints": fps,
                           "rows": rows, "files": entries, "models": models,
                           "has_face_bboxes": all(e["face_bboxes"] for e in entries),
                           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "summary": summary})
    return summary


@click.command("import-datacomp")
@click.argument("metadata_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Pool directory to create.")
@click.option("--no-uid-check", is_flag=True, help="Skip the scan of every uid (format and duplicates).")
@click.option("--overwrite", is_flag=True, help="Replace an existing import in OUT.")
def import_datacomp_cmd(metadata_dir, out, no_uid_check, overwrite):
    """Use DataComp's released metadata (parquet + npz) as a POOL, read in place.

    \b
    METADATA_DIR is what DataComp's download_upstream.py writes: <stem>.parquet (uid, url, text,
    original_width, original_height, clip_b32/l14_similarity_score, face_bboxes, sha256) and
    <stem>.npz (b32_img, b32_txt, l14_img, l14_txt). Nothing is converted: OUT gets symlinks and
    small index files, so `curate filter --recipe recipes/clip_l14_30pct.yaml --pool OUT` uses the
    precomputed scores and embeddings under ViT-B-32__openai and ViT-L-14__openai. Then download
    the kept rows with `curate download` (uids are kept, faces blurred).
    """
    s = import_datacomp(ImportConfig(metadata_dir=metadata_dir, out=out, check_uids=not no_uid_check,
                                     overwrite=overwrite))
    if s.get("up_to_date"):
        return
    click.echo(f"{s['out']}: {s['rows']} rows from {s['files']} files, embeddings {'yes' if s['embeddings'] else 'no'} "
               f"({', '.join(s['models'])}), {s['duplicate_uids'] or 0} duplicate uids, {s['seconds']}s")
