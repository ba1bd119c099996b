"""`Pool.open(path)`: one object for a POOL folder, whichever of its two forms it has.

    pool = Pool.open(path)                  # CurateError naming what is missing, or a WebdatasetPool / DataCompPool
    pool.metadata_files                     # POOL/metadata/*.parquet, sorted
    pool.meta_view_sql()                    # SELECT giving every metadata row in the pool metadata schema
    pool.embeddings_view_sql(model_id)      # SELECT of one model's embeddings (DataComp: row for row with meta)
    pool.models()                           # model ids with embeddings on disk
    pool.shards()                           # [Shard(index, tar, metadata)] (webdataset pools)
    pool.samples(shard, keys=...)           # the safe sample reader (curate.core.tar_reader), one set of caps
    batch_vectors(table, "image_emb")       # float32 vectors of a filter batch, from either form

The two forms (docs/FORMATS.md, "Pools"): a webdataset pool (`curate download`, `curate pool build-offline`:
metadata/, shards/, embeddings/<model id>/*.parquet written by `curate embed`) and a DataComp pool
(`curate pool import-datacomp`: DataComp's released parquet and npz read in place, curate.pool.datacomp).
Stages call the methods here instead of testing the form themselves, so a third form (or a change of
either) is one class, not a branch in every stage. The SQL of the DataComp form is curate.pool.datacomp's,
unchanged (its speed on 12.8M-row pools was measured, perf/RESULTS.md).
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any, Collection, Iterator

from curate.core.errors import CurateError
from curate.pool import datacomp
from curate.pool.io import Sample, Shard, iter_members, iter_samples, list_shards, read_metadata

NPZ_COLUMNS = ("_npz_src", "_npz_row", "_npz_prefix")  # where a DataComp row's vectors are (not filter columns)


def sql_str(s: str | os.PathLike) -> str:
    return "'" + str(s).replace("'", "''") + "'"


class Pool:
    """A validated pool folder. Build with `Pool.open`; `path` is the folder as given."""

    kind = "webdataset"

    def __init__(self, path: Path):
        self.path = path

    # ------------------------------------------------------------ opening
    @staticmethod
    def open(path: str | os.PathLike | "Pool") -> "Pool":
        """Validate `path` as a pool folder and return its form's object (a Pool is returned as is)."""
        if isinstance(path, Pool):
            return path
        p = Path(path)
        if not p.exists():
            raise CurateError(f"{p}: not a pool directory (no such folder)")
        if not p.is_dir():
            raise CurateError(f"{p}: not a pool directory (a file)")
        descriptor = datacomp.read_descriptor(p) if datacomp.is_datacomp_pool(p) else None  # named errors
        meta = p / "metadata"
        if not meta.is_dir():
            raise CurateError(f"{p}: not a pool directory (no metadata/ folder); build one with `curate download` or "
                              f"`curate pool build-offline`, or import DataComp's with `curate pool import-datacomp`")
        if not any(meta.glob("*.parquet")):
            raise CurateError(f"{p}: not a pool directory: {meta} has no parquet files (run `curate download` first)")
        if descriptor is None:
            return WebdatasetPool(p)
        pool = DataCompPool(p)
        pool.descriptor = descriptor  # read once: an xlarge pool's descriptor lists thousands of files
        return pool

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def is_datacomp(self) -> bool:
        return self.kind == "datacomp"

    # ------------------------------------------------------------ metadata
    @property
    def metadata_dir(self) -> Path:
        return self.path / "metadata"

    @property
    def metadata_glob(self) -> str:
        return str(self.metadata_dir / "*.parquet")

    @property
    def metadata_files(self) -> list[Path]:
        return sorted(self.metadata_dir.glob("*.parquet"))

    def meta_view_sql(self) -> str:
        """SELECT over every metadata row, in the pool metadata schema (docs/FORMATS.md, "Pool metadata")."""
        return f"SELECT * FROM read_parquet({sql_str(self.metadata_glob)})"

    def locate_uid_sql(self, uid: str | None) -> str | None:
        """SELECT of the metadata file holding `uid` (to name it in an error), None where files are not ours."""
        lit = sql_str(uid) if uid is not None else "NULL"
        return (f"SELECT filename FROM read_parquet({sql_str(self.metadata_glob)}, filename=true) "
                f"WHERE uid IS NOT DISTINCT FROM {lit} LIMIT 1")

    def read_metadata(self, shard: int | None = None, columns: list[str] | None = None, success_only: bool = False):
        return read_metadata(self.path, shard=shard, columns=columns, success_only=success_only)

    # ------------------------------------------------------------ embeddings
    @property
    def embeddings_dir(self) -> Path:
        return self.path / "embeddings"

    def embeddings_glob(self, model_id: str) -> str:
        return str(self.embeddings_dir / model_id / "*.parquet")

    def embedding_files(self, model_id: str) -> list[Path]:
        return sorted((self.embeddings_dir / model_id).glob("*.parquet"))

    def models(self) -> list[str]:
        """Model ids with embeddings in this pool (folders of embeddings/ holding parquet files)."""
        d = self.embeddings_dir
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if p.is_dir() and any(p.glob("*.parquet")))

    def embeddings_view_sql(self, model_id: str) -> str:
        """SELECT over one model's embeddings (uid, image_emb, text_emb, clip_score, ...)."""
        return f"SELECT * FROM read_parquet({sql_str(self.embeddings_glob(model_id))})"

    # ------------------------------------------------------------ samples
    def shards(self) -> list[Shard]:
        return list_shards(self.path)

    def samples(self, shard: Shard | int | str | os.PathLike, errors: list[str] | None = None, *,
                keys: Collection[str] | None = None) -> Iterator[Sample]:
        """The samples of one shard through the one safe reader (all, or only `keys`, skipped by seeking)."""
        return iter_samples(self._tar(shard), errors, keys=keys)

    def members(self, shard: Shard | int | str | os.PathLike, *, read: Collection[str] | None = None,
                errors: list[str] | None = None):
        """The members of one shard (`read=HEADERS`: headers only)."""
        return iter_members(self._tar(shard), read=read, errors=errors)

    def _tar(self, shard) -> Path:
        if isinstance(shard, Shard):
            return shard.tar
        if isinstance(shard, int):
            return self.path / "shards" / f"{shard:08d}.tar"
        return Path(shard)


class WebdatasetPool(Pool):
    """A pool with its samples in webdataset shards (`curate download`, the offline builder)."""

    kind = "webdataset"


class DataCompPool(Pool):
    """DataComp's released metadata read in place (curate.pool.datacomp): no shards until downloaded."""

    kind = "datacomp"

    @cached_property
    def descriptor(self) -> dict[str, Any]:
        return datacomp.read_descriptor(self.path)

    @property
    def rows(self) -> int:
        return int(self.descriptor["rows"])

    def meta_view_sql(self) -> str:
        return datacomp.meta_view_sql(self.path)

    def locate_uid_sql(self, uid: str | None) -> str | None:
        return None  # the view's uid is DataComp's column, not a file of ours to point at

    def embeddings_view_sql(self, model_id: str) -> str:
        # DataComp's own models: the metadata row for row + clip_score + npz locations; others (embedded
        # later with `curate embed`) are plain parquet like any pool's
        return datacomp.embeddings_view_sql(self.path, model_id) or super().embeddings_view_sql(model_id)

    def shards(self) -> list[Shard]:
        raise CurateError(f"{self.path}: a DataComp pool has metadata only; download its samples first "
                          f"(`curate download` of a subset)")


def vectors_from_column(arr, n: int):
    """fixed_size_list<float16>[d] (nulls allowed) -> float32 (n, d) with NaN rows for nulls."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if arr is None:
        return None
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], arr.type)
    if pa.types.is_null(arr.type) or len(arr) == 0:
        return np.zeros((n, 0), np.float32)
    if not pa.types.is_fixed_size_list(arr.type):
        # DuckDB may hand back a variable list type; cast keeps values exact.
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        d = int(np.nanmax(np.where(np.isnan(lengths.astype(float)), 0, lengths))) if len(lengths) else 0
        arr = arr.cast(pa.list_(arr.type.value_type, d))
    d = arr.type.list_size
    values = arr.values.slice(arr.offset * d, len(arr) * d)
    out = pc.fill_null(values, np.nan).to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(arr), d)
    if arr.null_count:
        out[arr.is_null().to_numpy(zero_copy_only=False)] = np.nan
    return out


def batch_vectors(table, column: str):
    """float32 (n, d) vectors of `column` ("image_emb" or "text_emb") for a batch of an embeddings view.

    A module function, not a method, because batches are applied in worker processes that get the table
    only: a DataComp batch carries where its vectors are (`NPZ_COLUMNS`), any other carries the vectors."""
    if NPZ_COLUMNS[0] in table.column_names:
        return datacomp.batch_vectors(table, {"image_emb": "img", "text_emb": "txt"}[column])
    return vectors_from_column(table[column], table.num_rows)
