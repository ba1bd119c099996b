"""Safe, small read API for a POOL directory (docs/FORMATS.md, "Pools"), shared by embed, reshard and eval.

    shards = list_shards(pool)                  # [Shard(index, tar, metadata), ...] sorted by index
    table = read_metadata(pool)                 # all metadata rows (pyarrow), or read_metadata(pool, shard=3)
    for s in iter_samples(shard.tar):           # Sample(key, uid, image, text, meta, error, members)
        img = decode_image(s.image)             # RGB PIL image, or ImageDecodeError with a reason

The tar reader (`iter_samples`, `iter_members`: read all, wanted keys only with seeking, headers only) and
the image decoder are the kernel's (curate.core.tar_reader, curate.core.images), re-exported here: they
are the only ones in the project, with one `MAX_MEMBER_BYTES` and a per-call pixel cap, so filters/ (which
may import only the kernel) read evaluation shards the same way. A pool folder as a whole (validation,
its DataComp form, views) is `curate.pool.pool.Pool`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from curate.core.errors import CurateError
from curate.core.images import MAX_IMAGE_PIXELS, ImageDecodeError, decode_image, decode_image_file
from curate.core.tar_reader import (
    HEADERS, IMAGE_EXTS, MAX_MEMBER_BYTES, Member, Sample, iter_members, iter_samples, split_name, unsafe_name,
)

__all__ = ["SHARD_RE", "Shard", "check_pool", "list_shards", "read_metadata", "read_shard_metadata",
           "HEADERS", "IMAGE_EXTS", "MAX_MEMBER_BYTES", "MAX_IMAGE_PIXELS", "Member", "Sample", "ImageDecodeError",
           "decode_image", "decode_image_file", "iter_members", "iter_samples", "split_name", "unsafe_name"]

SHARD_RE = re.compile(r"^(\d{8})\.(tar|parquet)$")


@dataclass(frozen=True)
class Shard:
    """One shard of a pool: its number, tar and metadata paths (either may be absent on disk)."""

    index: int
    tar: Path
    metadata: Path

    @property
    def name(self) -> str:
        return f"{self.index:08d}"


def check_pool(pool: str | Path) -> Path:
    pool = Path(pool)
    if not (pool / "metadata").is_dir():
        raise CurateError(f"{pool}: not a pool directory (no metadata/ folder); build one with `curate pool ...`")
    return pool


def list_shards(pool: str | Path) -> list[Shard]:
    """All shards of `pool`, sorted by index; a shard exists when its metadata parquet does."""
    pool = check_pool(pool)
    shards = []
    for p in sorted((pool / "metadata").iterdir()):
        m = SHARD_RE.match(p.name)
        if m and m.group(2) == "parquet":
            i = int(m.group(1))
            shards.append(Shard(i, pool / "shards" / f"{i:08d}.tar", p))
    if not shards:
        raise CurateError(f"{pool}/metadata: no shard metadata files ({{shard:08d}}.parquet)")
    return shards


def read_metadata(pool: str | Path, shard: int | None = None, columns: list[str] | None = None,
                  success_only: bool = False):
    """Pool metadata as a pyarrow Table: one shard, or all shards concatenated in shard order."""
    import pyarrow as pa

    shards = list_shards(pool)
    if shard is not None:
        shards = [s for s in shards if s.index == shard]
        if not shards:
            raise CurateError(f"{pool}: no metadata for shard {shard}")
    tables = [read_shard_metadata(s, columns=columns, success_only=success_only) for s in shards]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def read_shard_metadata(shard: Shard, columns: list[str] | None = None, success_only: bool = False):
    """One shard's metadata table, with a clear error naming the file if it is unreadable or malformed."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    cols = None if columns is None else list(dict.fromkeys(list(columns) + (["status"] if success_only else [])))
    try:
        t = pq.read_table(shard.metadata, columns=cols)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise CurateError(f"{shard.metadata}: cannot read pool metadata ({e})") from None
    needed = {"uid", "key", "status"} & set(cols if cols is not None else {"uid", "key", "status"})
    missing = needed - set(t.column_names)
    if missing:
        raise CurateError(f"{shard.metadata}: missing column(s) {sorted(missing)} (see docs/FORMATS.md, 'Pool metadata')")
    if success_only:
        t = t.filter(pc.equal(t["status"], "success"))
        if columns is not None and "status" not in columns:
            t = t.drop_columns(["status"])
    return t
