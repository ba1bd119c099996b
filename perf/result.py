"""The machine-readable result every perf/bench_*.py can write with ``--json FILE`` (read by perf.run_all).

One shape for all stages, so run_all can tabulate and compare them without knowing each bench:
``figure`` (what we measure, e.g. curate's rows/s), ``baseline`` (the same quantity for the reference
it runs side by side), ``ratio`` (figure / baseline oriented so that > 1 means curate is better),
plus the bench's own ``details``. Wall time, CPU seconds and load are added by run_all, which runs
the bench as a child process and can measure them from outside.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def bench_result(name: str, figure: float, baseline: float, unit: str, *, higher_is_better: bool = True,
                 baseline_name: str = "", ratio_name: str = "", goal: float | None = None,
                 details: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dict a bench writes; `ratio` = figure / baseline (or baseline / figure for times)."""
    ratio = (figure / baseline if higher_is_better else baseline / figure) if figure and baseline else None
    return {"bench": name, "figure": round(float(figure), 4), "baseline": round(float(baseline), 4), "unit": unit,
            "higher_is_better": higher_is_better, "baseline_name": baseline_name, "ratio": round(ratio, 3) if ratio else None,
            "ratio_name": ratio_name or ("speed-up vs " + baseline_name), "goal": goal, "details": details or {}}


def write(path: str | Path | None, result: dict[str, Any]) -> None:
    """Write `result` as JSON to `path` (no-op without --json)."""
    if path:
        Path(path).write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
