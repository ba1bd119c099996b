"""The stage contract: what every stage returns, and how it knows it is already done.

Why: "is this stage already done?" was written by hand in each stage, with its own fingerprint and its own
package-version reader, and the summaries disagreed (`up_to_date` here, `computed` or `unchanged` there), so
`curate run` patched them up. Here, once:

* `StageSummary`: `up_to_date`, `seconds`, counts and outputs, plus the stage's own fields (`fields`).
  `as_dict()` is the flat dictionary the stages returned before (the field names callers and tests read),
  with `up_to_date` and `seconds` always present; `curate run` reads `up_to_date` from it and nothing else.
* `fingerprint(*parts)`: one content key (sha256 of the parts in order, 16 hex characters).
* `file_signature(path)`: a cheap fingerprint of a large file (size, mtime and a hash of its last 64 KiB,
  where a parquet file keeps its footer: row counts, statistics and offsets).
* `Marker`: a JSON completion marker, written last and atomically; a stage is done when its marker exists,
  is readable and records the fingerprint of the inputs it would compute from now (`Marker.matching`).
* `versions(*dists)`: the versions of the packages a result depends on, read from package metadata (importing
  torch to ask would cost seconds).
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curate.core.version import __version__


@dataclass
class StageSummary:
    """What a stage function returns (as `as_dict()`): whether it was up to date, how long it took, what it
    counted and wrote, and the stage's own fields (kept under their names)."""

    stage: str
    up_to_date: bool
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The flat summary: the stage's fields, then counts and outputs under their own names, then
        `up_to_date` and `seconds` (rounded to ms)."""
        return {**self.fields, **self.counts, **self.outputs, "up_to_date": bool(self.up_to_date),
                "seconds": round(float(self.seconds), 3)}


def fingerprint(*parts: str) -> str:
    """One content key for a stage's inputs: sha256 over the parts in order, 16 hex characters."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
    return h.hexdigest()[:16]


def file_signature(path: Path) -> dict[str, Any]:
    """Cheap content fingerprint of a (large) file: size, mtime and sha256 of its last 64 KiB.

    A full hash of a 12.8M-row pool would cost seconds on every run; a parquet file's footer (at its end) holds
    row counts, column statistics and offsets, so any rewrite of the data changes it."""
    path = Path(path)
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(max(0, st.st_size - 65536))
        h.update(fh.read())
    return {"file": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "tail_sha256": h.hexdigest()[:16]}


@dataclass(frozen=True)
class Marker:
    """A JSON completion marker at `path` holding the fingerprint of the inputs it was computed from (under the
    key `fingerprint`; the filter's manifest.json calls it `run_key`)."""

    path: Path

    def read(self) -> dict[str, Any] | None:
        """The marker's record; None when it is missing, unreadable or not a JSON object (then: not done)."""
        try:
            rec = json.loads(Path(self.path).read_text())
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) else None

    def matching(self, fp: str, key: str = "fingerprint") -> dict[str, Any] | None:
        """The record when it was computed from inputs with fingerprint `fp` (under `key`), else None."""
        rec = self.read()
        return rec if rec is not None and rec.get(key) == fp else None

    def write(self, record: dict[str, Any]) -> None:
        """Write the record atomically (the last write of the work it marks done)."""
        from curate.core.atomic import write_json

        write_json(Path(self.path), record)


def versions(*dists: str) -> dict[str, str]:
    """{"curate", "python", each of `dists` that is installed: its version}, from package metadata."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"curate": __version__, "python": platform.python_version()}
    for dist in dists:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out
