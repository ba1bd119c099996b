"""Helpers shared by the reliability tests."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curate.core.atomic import TEMP_PREFIX


def temp_files(root: Path) -> list[Path]:
    """Files or folders an atomic writer left behind (curate.core.atomic's temp prefix)."""
    return [p for p in Path(root).rglob("*") if p.name.startswith(TEMP_PREFIX)]


def sorted_table(path: Path, by: list[str]) -> pa.Table:
    """A parquet file as a table sorted by `by`: equality that ignores row order, not content."""
    t = pq.read_table(path)
    return t.sort_by([(c, "ascending") for c in by])
