"""The uid contract (docs/FORMATS.md, "uid").

A uid is 32 lowercase hex characters (128 bits), derived deterministically from a (url, caption)
pair. DataComp exchanges subsets as ``uids.npy``: a numpy structured array of dtype ``"u8,u8"``
holding the high and low 64 bits, sorted ascending, duplicates meaning upsampling.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from curate.core.atomic import atomic_path
from curate.core.errors import CurateError

UID_DTYPE = np.dtype("u8,u8")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")


def make_uid(url: str, text: str | None) -> str:
    """Stable 128-bit uid of a (url, caption) pair.

    The two fields are length-prefixed before hashing so that ("ab", "c") and ("a", "bc") differ.
    """
    url_b = (url or "").encode("utf-8")
    text_b = (text or "").encode("utf-8")
    h = hashlib.blake2b(digest_size=16)
    h.update(len(url_b).to_bytes(8, "little"))
    h.update(url_b)
    h.update(len(text_b).to_bytes(8, "little"))
    h.update(text_b)
    return h.hexdigest()


def is_uid(s: object) -> bool:
    return isinstance(s, str) and bool(_HEX32.match(s))


def validate_uids(uids: Iterable[str], source: str = "uids") -> None:
    """Raise CurateError naming the first value that is not 32 lowercase hex characters."""
    for i, u in enumerate(uids):
        if not is_uid(u):
            raise CurateError(f"{source}: row {i} has uid {u!r}, expected 32 lowercase hex characters")


def encode(uids: Sequence[str]) -> np.ndarray:
    """Hex uids -> sorted DataComp structured array (duplicates kept)."""
    uids = list(uids)
    validate_uids(uids)
    arr = np.empty(len(uids), dtype=UID_DTYPE)
    if uids:
        arr["f0"] = np.fromiter((int(u[:16], 16) for u in uids), dtype=np.uint64, count=len(uids))
        arr["f1"] = np.fromiter((int(u[16:], 16) for u in uids), dtype=np.uint64, count=len(uids))
    arr.sort(order=["f0", "f1"])
    return arr


def decode(arr: np.ndarray) -> list[str]:
    """DataComp structured array -> hex uids, in array order."""
    return [f"{int(a):016x}{int(b):016x}" for a, b in zip(arr["f0"], arr["f1"])]


def check_array(arr: np.ndarray, source: str = "uids.npy") -> np.ndarray:
    """Validate a uid array as DataComp expects it: dtype u8,u8 and sorted ascending."""
    if arr.dtype != UID_DTYPE:
        raise CurateError(f"{source}: dtype is {arr.dtype}, expected structured dtype {UID_DTYPE} (DataComp uids.npy)")
    if arr.ndim != 1:
        raise CurateError(f"{source}: expected a 1-d array, got shape {arr.shape}")
    if len(arr) > 1:
        hi, lo = arr["f0"], arr["f1"]
        bad = (hi[1:] < hi[:-1]) | ((hi[1:] == hi[:-1]) & (lo[1:] < lo[:-1]))
        if bad.any():
            i = int(np.argmax(bad))
            raise CurateError(f"{source}: not sorted ascending at index {i + 1}; DataComp requires sorted uids")
    return arr


def save(path: str | os.PathLike, uids: Sequence[str] | np.ndarray) -> np.ndarray:
    """Write uids (hex strings or an encoded array) to `path` atomically in DataComp format."""
    arr = uids if isinstance(uids, np.ndarray) and uids.dtype == UID_DTYPE else encode(list(uids))
    arr = np.sort(arr, order=["f0", "f1"])
    with atomic_path(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, arr)
    return arr


def write_subset(subset: str | os.PathLike, uids: Sequence[str], manifest: dict) -> bool:
    """SUBSET/uids.npy + manifest.json for a subset chosen by code (a control, a scorer's training set), rewritten
    only when the uid list changed, so a resharded copy and runs trained on it stay valid on a re-run.

    `manifest` is what the subset's manifest.json should say (recipe name and rule, pool, counts); its
    `uids_digest` (sha256 of the sorted encoded uids) is added here and is what decides "changed". Returns True
    when the files were (re)written."""
    import json

    from curate.core.atomic import write_json

    subset = Path(subset)
    arr = np.sort(encode(list(uids)), order=["f0", "f1"])
    digest = hashlib.sha256(arr.tobytes()).hexdigest()
    man = subset / "manifest.json"
    if man.is_file() and (subset / "uids.npy").is_file():
        try:
            if json.loads(man.read_text()).get("uids_digest") == digest:
                return False
        except ValueError:
            pass  # a damaged manifest is rewritten
    save(subset / "uids.npy", arr)
    write_json(man, {**manifest, "uids_digest": digest})
    return True


def load(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    """Load and validate a DataComp uids.npy (optionally memory-mapped)."""
    path = Path(path)
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise CurateError(f"{path}: no such file") from None
    except (ValueError, OSError) as e:
        raise CurateError(f"{path}: not a numpy .npy file ({e})") from None
    return check_array(arr, str(path))
