"""Safe, small read API for a POOL directory (docs/FORMATS.md, "Pools"), shared by embed, reshard and eval.

    shards = list_shards(pool)                  # [Shard(index, tar, metadata), ...] sorted by index
    table = read_metadata(pool)                 # all metadata rows (pyarrow), or read_metadata(pool, shard=3)
    for s in iter_samples(shard.tar):           # Sample(key, uid, image, text, meta, error)
        img = decode_image(s.image)             # RGB PIL image, or ImageDecodeError with a reason

Safety: tar members are read into memory and never extracted, so a member name is never used as a
file path; names that are absolute, contain ``..`` or are not regular files are still rejected
(recorded as a sample error) because a later stage may write them out. Members larger than
`MAX_MEMBER_BYTES` are not read, and images over `MAX_IMAGE_PIXELS` are refused before decoding.

Why tarfile by hand rather than webdataset's iterator: we need per-member name checks, a size cap
before reading, and a bad sample recorded with its reason instead of webdataset's skip-or-raise
handlers; the webdataset grouping rule (key = name up to the first dot of the basename) is kept, so
the same tars work with webdataset everywhere else.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator

from curate.core.errors import CurateError

SHARD_RE = re.compile(r"^(\d{8})\.(tar|parquet)$")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
MAX_MEMBER_BYTES = 64 << 20  # a single sample member above this is refused, not read into memory
MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb cap (PIL's own default warns at 89M)


@dataclass(frozen=True)
class Shard:
    """One shard of a pool: its number, tar and metadata paths (either may be absent on disk)."""

    index: int
    tar: Path
    metadata: Path

    @property
    def name(self) -> str:
        return f"{self.index:08d}"


@dataclass
class Sample:
    """One webdataset sample. `image` is None when absent or refused; `error` then says why."""

    key: str
    uid: str | None = None
    image: bytes | None = None
    text: str | None = None
    meta: dict = field(default_factory=dict)
    error: str | None = None


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image (the message is the reason recorded in outputs)."""


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


def _unsafe_name(name: str) -> str | None:
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith(("/", "\\")) or ".." in p.parts or "\\" in name or "\x00" in name:
        return f"unsafe tar member name {name!r}"
    return None


def _split(name: str) -> tuple[str, str]:
    """webdataset's rule: key = path up to the first dot of the basename; ext = the rest (lowercased)."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def iter_samples(tar_path: str | Path, errors: list[str] | None = None) -> Iterator[Sample]:
    """Yield the samples of a webdataset tar in file order, reading members into memory only.

    A problem with one sample (unsafe name, oversize member, bad json) is put in `Sample.error`.
    A damaged or truncated tar stops the iteration: if `errors` is a list the reason is appended to
    it (the caller records the samples it never saw), otherwise CurateError names the file.
    """
    tar_path = Path(tar_path)
    current: Sample | None = None
    try:
        with tarfile.open(tar_path, "r|*") as tar:  # streaming: no seeks, works on pipes too
            for member in tar:
                bad = _unsafe_name(member.name)
                if member.isdir():
                    continue
                key, ext = _split(member.name)
                if current is not None and key != current.key:
                    yield _finish(current)
                    current = None
                if current is None:
                    current = Sample(key=key)
                if bad or not member.isfile():
                    current.error = bad or f"tar member {member.name!r} is not a regular file"
                    continue
                if member.size > MAX_MEMBER_BYTES:
                    current.error = f"tar member {member.name!r} is {member.size} bytes (cap {MAX_MEMBER_BYTES})"
                    continue
                fh = tar.extractfile(member)
                data = fh.read() if fh is not None else b""
                if ext in IMAGE_EXTS:
                    current.image = data
                elif ext == "txt":
                    current.text = data.decode("utf-8", errors="replace")
                elif ext == "json":
                    try:
                        meta = json.loads(data)
                        current.meta = meta if isinstance(meta, dict) else {}
                    except ValueError as e:
                        current.error = current.error or f"{member.name}: bad json ({e})"
        if current is not None:
            yield _finish(current)
    except (tarfile.TarError, OSError, EOFError) as e:
        msg = f"{tar_path}: damaged or truncated tar ({type(e).__name__}: {e})"
        if errors is None:
            raise CurateError(msg) from None
        errors.append(msg)


def _finish(s: Sample) -> Sample:
    uid = s.meta.get("uid")
    s.uid = uid if isinstance(uid, str) else None
    if s.error:
        s.image = None  # never hand out the image of a sample we refused
    return s


def decode_image(data: bytes | None, max_pixels: int = MAX_IMAGE_PIXELS):
    """Bytes -> RGB PIL image, or ImageDecodeError whose message is a short, recordable reason."""
    from PIL import Image

    if not data:
        raise ImageDecodeError("no image bytes in shard")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise ImageDecodeError(f"image is {w}x{h} pixels, over the cap of {max_pixels}")
        img.load()
        return img.convert("RGB")
    except ImageDecodeError:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
        # PIL puts the buffer's memory address in some messages; drop it so reruns write identical files.
        why = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
        raise ImageDecodeError(f"undecodable image: {type(e).__name__}: {why}") from None
