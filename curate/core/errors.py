"""User-facing errors.

Every error a user can cause (bad input file, bad recipe, missing package) is raised as a
`CurateError`: the CLI prints its message without a stack trace and exits with status 2.
Bugs stay ordinary exceptions so their traces remain visible.
"""

from __future__ import annotations

import errno
import os

import click


class CurateError(click.ClickException):
    """An error caused by the user's input or environment, with a message that says how to fix it."""

    exit_code = 2


class MissingDependencyError(CurateError):
    """A system package or data source the command needs is not installed."""

    def __init__(self, what: str, install: str):
        super().__init__(f"{what} is not installed. Install it with:\n    {install}")


# Failures of the machine rather than of curate: the message says what happened and that a rerun
# resumes. Matched on errno, and on the C library's wording for exceptions from pyarrow and DuckDB,
# which report a failed write as a message without an errno.
_FULL = {errno.ENOSPC: "the disk is full", errno.EFBIG: "a file size limit was reached",
         errno.EDQUOT: "the disk quota is exhausted"}
_DENIED = {errno.EACCES: "permission denied", errno.EROFS: "the file system is read-only"}
RESUME = ("Finished work is kept and nothing partial is marked complete: fix this and rerun the same command "
          "to resume.")


class MachineFailure(CurateError):
    """A full disk, an unwritable output, a dead worker or exhausted memory, reported by `environment_error`."""


def environment_error(exc: BaseException) -> MachineFailure | None:
    """A MachineFailure for a full disk, an unwritable output, a dead worker process or exhausted
    memory found anywhere in `exc`'s chain (`exc` itself when it already is one); None for anything
    else (a user error keeps its message, a bug its traceback)."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 10:
        seen += 1
        if isinstance(e, MachineFailure):
            return e
        text = _last_line(str(e))
        for table in (_FULL, _DENIED):
            for code, what in table.items():
                if getattr(e, "errno", None) == code or os.strerror(code) in text:
                    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
                    if "/torch_" in text:  # a loader worker's shared-memory tensor
                        where = " (shared memory of the loader workers: see `df -h /dev/shm`, or use fewer workers)"
                    return MachineFailure(f"{what}{where}: {text}\n{RESUME}")
        name = type(e).__name__
        if name == "BrokenProcessPool" or "DataLoader worker" in text and ("killed" in text or "exited" in text):
            return MachineFailure(f"a worker process died ({text or name}); the usual causes are the out-of-memory "
                                  f"killer or a crash in a native library (see `dmesg`). {RESUME}")
        if isinstance(e, MemoryError):
            return MachineFailure(f"out of memory ({text or 'MemoryError'}): lower --workers or the batch size. {RESUME}")
        e = e.__cause__ or e.__context__
    return None


def _last_line(text: str) -> str:
    """An exception re-raised from a worker (torch's DataLoader) carries the worker's whole traceback
    in its message; its last line is the error itself."""
    if "Traceback" not in text:
        return text
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else text
