"""Make torch DataLoader worker failures reach the main process instead of hanging it.

A worker process hands each batch to the main process through a multiprocessing queue; torch moves
the batch's tensors into shared memory (/dev/shm) while pickling them, in the queue's *feeder
thread*. If that fails (a full /dev/shm, as in a default Docker container, or a file size limit),
the feeder thread only prints the error and drops the batch, and the main process waits forever.

`share_tensors` does the move earlier, in the worker's own iteration, where an exception is caught
by the DataLoader and re-raised in the main process (curate's CLI then reports it as one error
saying what filled up). It is the same copy torch would make, so it costs nothing extra; the later
pickling finds the storage already shared.
"""

from __future__ import annotations

from typing import Any


def in_worker() -> bool:
    """True inside a DataLoader worker process."""
    from torch.utils.data import get_worker_info

    return get_worker_info() is not None


def share_tensors(obj: Any) -> Any:
    """Move every tensor in `obj` (a tensor, or a dict/list/tuple holding tensors) to shared memory."""
    if hasattr(obj, "share_memory_"):
        obj.share_memory_()
    elif isinstance(obj, dict):
        for v in obj.values():
            share_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            share_tensors(v)
    return obj
