"""The one safe reader of webdataset tars (pool shards, evaluation shards), with one set of caps.

    for s in iter_samples(tar):                          # read all: Sample(key, uid, image, text, meta, error, members)
    for s in iter_samples(tar, keys=wanted):             # only these keys; other samples are skipped by seeking
    for m in iter_members(tar, read=HEADERS):            # headers only: Member(name, key, ext, size), no data
    for m in iter_members(tar, read={"json"}):           # headers, plus the bytes of the json members

Safety: members are read into memory and never extracted, so a member name is never used as a file
path; names that are absolute, contain ``..``, a backslash or a NUL, and members that are not regular
files, are still refused (a `Member.problem`, a `Sample.error`) because a later stage may write them out.
A member larger than `MAX_MEMBER_BYTES` is not read. Grouping follows webdataset (key = the name up to the
first dot of its base name, members of a sample are consecutive), so the same tars work with webdataset
everywhere else.

Why tarfile by hand rather than webdataset's iterator: we need per-member name checks, a size cap before
reading, a bad sample recorded with its reason instead of webdataset's skip-or-raise handlers, and the
seek past unwanted samples that makes resharding a small subset cheap (its bytes are never read).

In curate.core rather than curate.pool because filters/ (decontaminate reads evaluation shards) may import
only the kernel; curate.pool.io re-exports it with the pool's metadata readers.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Collection, Iterator

from curate.core.errors import CurateError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
MAX_MEMBER_BYTES = 64 << 20  # a single sample member above this is refused, not read into memory
HEADERS: frozenset[str] = frozenset()  # `read=HEADERS`: no member's bytes are read


@dataclass
class Member:
    """One tar member. `data` is None when it was not read (headers only, not asked for, refused)."""

    name: str
    key: str
    ext: str
    size: int
    is_dir: bool = False
    data: bytes | None = None
    problem: str | None = None  # why the member was refused: unsafe name, not a regular file, over the cap


@dataclass
class Sample:
    """One webdataset sample. `image` is None when absent or refused; `error` then says why.

    `members` holds the bytes of every member read, by extension (lowercased), for stages that copy
    samples whole (reshard)."""

    key: str
    uid: str | None = None
    image: bytes | None = None
    text: str | None = None
    meta: dict = field(default_factory=dict)
    error: str | None = None
    members: dict[str, bytes] = field(default_factory=dict)


def unsafe_name(name: str) -> str | None:
    """Why `name` could not be written out as a relative path (None when it could)."""
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith(("/", "\\")) or ".." in p.parts or "\\" in name or "\x00" in name:
        return f"unsafe tar member name {name!r}"
    return None


def split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: key = path up to the first dot of the basename; ext = the rest (lowercased)."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def iter_members(tar_path: str | Path, *, read: Collection[str] | None = None, keys: Collection[str] | None = None,
                 errors: list[str] | None = None, max_member_bytes: int = MAX_MEMBER_BYTES,
                 check_names: bool = True) -> Iterator[Member]:
    """Yield the members of a tar in file order, directories included (``is_dir``, never read).

    `read`: extensions whose bytes are read (None: every member's; `HEADERS`: none). `keys`: only members
    of these sample keys are yielded, the others are passed by seeking without reading their bytes.
    A damaged or truncated tar stops the iteration: if `errors` is a list the reason is appended to it
    (the caller records what it never saw), otherwise CurateError names the file. `check_names=False`
    reads members whatever their names, for a caller that never uses a name but as a label.
    """
    tar_path = Path(tar_path)
    # Streaming mode reads every byte once and works on pipes; seekable mode is what lets unwanted
    # members (other keys, unread extensions) cost a header read instead of their size.
    mode = "r|*" if read is None and keys is None else "r:*"
    try:
        with tarfile.open(tar_path, mode) as tar:
            for m in tar:
                key, ext = split_name(m.name)
                if keys is not None and key not in keys:
                    continue  # not wanted: its bytes are never read
                member = Member(m.name, key, ext, m.size, is_dir=m.isdir())
                if member.is_dir:
                    yield member
                    continue
                member.problem = unsafe_name(m.name) if check_names else None
                if member.problem is None and not m.isfile():
                    member.problem = f"tar member {m.name!r} is not a regular file"
                if member.problem is None and m.size > max_member_bytes:
                    member.problem = f"tar member {m.name!r} is {m.size} bytes (cap {max_member_bytes})"
                if member.problem is None and (read is None or ext in read):
                    fh = tar.extractfile(m)
                    member.data = fh.read() if fh is not None else b""
                yield member
    except (tarfile.TarError, OSError, EOFError) as e:
        msg = f"{tar_path}: damaged or truncated tar ({type(e).__name__}: {e})"
        if errors is None:
            raise CurateError(msg) from None
        errors.append(msg)


def iter_samples(tar_path: str | Path, errors: list[str] | None = None, *, keys: Collection[str] | None = None,
                 max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[Sample]:
    """Yield the samples of a webdataset tar in file order (only those of `keys` when given).

    A problem with one sample (unsafe name, oversize member, bad json) is put in `Sample.error`.
    Damaged tars: as `iter_members`.
    """
    current: Sample | None = None
    n_errors = len(errors) if errors is not None else 0
    for m in iter_members(tar_path, keys=keys, errors=errors, max_member_bytes=max_member_bytes):
        if m.is_dir:
            continue
        if current is not None and m.key != current.key:
            yield _finish(current)
            current = None
        if current is None:
            current = Sample(key=m.key)
        if m.problem:
            current.error = m.problem
            continue
        data = m.data if m.data is not None else b""
        current.members[m.ext] = data
        if m.ext in IMAGE_EXTS:
            current.image = data
        elif m.ext == "txt":
            current.text = data.decode("utf-8", errors="replace")
        elif m.ext == "json":
            try:
                meta = json.loads(data)
                if not isinstance(meta, dict):
                    raise ValueError(f"a JSON {type(meta).__name__}, not an object")
                current.meta = meta
            except ValueError as e:
                current.error = current.error or f"{m.name}: bad json ({e})"
    if current is not None and (errors is None or len(errors) == n_errors):
        yield _finish(current)  # (a sample cut short by a damaged tar is not handed out)


def _finish(s: Sample) -> Sample:
    uid = s.meta.get("uid")
    s.uid = uid if isinstance(uid, str) else None
    if s.error:
        s.image = None  # never hand out the image of a sample we refused
        s.members = {}
    return s
