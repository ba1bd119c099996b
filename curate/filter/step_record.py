"""What one executed recipe step left behind, as the report and other readers of a finished run see it.

The engine's runner keeps richer internal state; readers get this typed record instead, so they never
depend on the runner's internals.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StepRecord:
    step: str                 # ledger step name: "pool" or "<path>.<filter>", e.g. "1.clip_score"
    filter: str               # the filter's recipe key ("pool", "intersect", "union" for the structural steps)
    file: Path                # the step's cached decisions parquet: uid, kept, score, threshold, reason
    threshold: float | None   # the cut the step applied to its score, if it has one
