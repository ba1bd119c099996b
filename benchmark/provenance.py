"""Where a result came from: the SUBSET a RUN trained on and how complete that subset's pool was.

Its own module so that the bundle packer (benchmark.submit) and `curate compare` (benchmark.compare) read a
run's provenance the same way without importing each other (benchmark.submit already reaches the leaderboard,
which reaches benchmark.compare).
"""

from __future__ import annotations

from pathlib import Path

from benchmark.results import first, read_json
from curate.core.errors import CurateError
from curate.pool.completeness import pool_completeness


def subset_dir_of(run: Path, info: dict) -> Path | None:
    """Locate the SUBSET a run was trained on from its info.json (the trainer records its path)."""
    raw = first(info, "subset", "subset_path", "data", "data_path")
    if isinstance(raw, dict):
        raw = first(raw, "path", "dir")
    if not raw:
        return None
    p = Path(raw)
    if not p.is_absolute() and not p.exists():
        p = (run / raw)
    if not (p / "uids.npy").is_file() and (p.parent / "uids.npy").is_file():
        p = p.parent  # the trainer was pointed at SUBSET/shards
    return p


def pool_completeness_of_subset(subset: Path) -> dict:
    """curate.pool.completeness of the pool a SUBSET was filtered from (its manifest.json names the pool)."""
    man_path = Path(subset) / "manifest.json"
    pool = None
    if man_path.is_file():
        try:
            man = read_json(man_path, "filter manifest")
        except CurateError:
            man = {}
        pool = first(man, "pool") or first(man.get("summary") or {}, "pool")
    return pool_completeness(pool)


def run_pool_completeness(run: Path, info: dict) -> dict | None:
    """The completeness of the pool a RUN's subset came from, or None when info.json names no subset."""
    subset = subset_dir_of(Path(run), info)
    return pool_completeness_of_subset(subset) if subset is not None else None
