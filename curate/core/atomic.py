"""Atomic file output: every file is written to a temporary sibling and renamed into place.

A reader (or a resumed run) therefore sees either the complete previous file or the complete new
one, never a partial write. Temporary names start with ``.tmp-`` so that `cleanup_temp_files`
can remove what a killed run left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Iterator

TEMP_PREFIX = ".tmp-"


def _read_umask() -> int:
    # os.umask can only be read by setting it; do it once at import, before worker threads exist.
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `dest`; on success fsync and rename it onto `dest`.

    On any exception the temporary file is removed and `dest` is left untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX + dest.name + ".", suffix=suffix, dir=dest.parent)
    # mkstemp creates 0600; give the file the permissions an ordinary open() would (0666 minus umask)
    # so outputs stay readable by the user's group and tools, as any other written file.
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp_path, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text(dest: str | os.PathLike, text: str) -> None:
    write_bytes(dest, text.encode("utf-8"))


def write_json(dest: str | os.PathLike, obj: Any) -> None:
    write_text(dest, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(dest: str | os.PathLike, table, **kwargs) -> None:
    """Write a pyarrow Table (or anything `pa.table` accepts) atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.table(table)
    with atomic_path(dest, suffix=".parquet") as tmp:
        pq.write_table(table, tmp, **kwargs)


def cleanup_temp_files(folder: str | os.PathLike) -> int:
    """Remove temporary files a killed run left in `folder` (recursively); return how many."""
    n = 0
    for p in Path(folder).rglob(TEMP_PREFIX + "*"):
        if p.is_file():
            p.unlink()
            n += 1
    return n


def cleanup_temp_siblings(dest: str | os.PathLike) -> int:
    """Remove the temporary files a killed writer of `dest` left beside it; return how many.

    For stages whose output shares a folder with other stages' files (a RUN folder holds the
    trainer's checkpoints and the evaluator's results), so only this output's temps are touched."""
    dest = Path(dest)
    n = 0
    for p in dest.parent.glob(TEMP_PREFIX + glob_escape(dest.name) + ".*"):
        if p.is_file():
            p.unlink()
            n += 1
    return n
