"""Reading evaluation results: a RUN's or a bundle's `eval_results.jsonl`, each line's main metric, the average.

Its own module so that both the bundle packer (`benchmark.submit`) and the leaderboard read results the same way
without importing each other.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from curate.core.errors import CurateError


def read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except FileNotFoundError:
        raise CurateError(f"{path}: missing ({what})") from None
    except json.JSONDecodeError as e:
        raise CurateError(f"{path}: not valid JSON ({what}): line {e.lineno}: {e.msg}") from None
    if not isinstance(obj, dict):
        raise CurateError(f"{path}: expected a JSON object ({what})")
    return obj


def read_results(path: Path) -> list[dict]:
    """Read an eval results JSONL (docs/FORMATS.md, "Evaluation results"), naming the line of any malformed record."""
    if not path.is_file():
        raise CurateError(f"{path}: missing (evaluation results; run `curate evaluate` first)")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise CurateError(f"{path}: line {i} is not valid JSON ({e.msg})") from None
            if not isinstance(r, dict) or "key" not in r:
                raise CurateError(f"{path}: line {i} has no 'key' field")
            try:
                main_value(r)
            except ValueError as e:
                raise CurateError(f"{path}: line {i} ({r['key']}): {e}") from None
            rows.append(r)
    keys = [r["key"] for r in rows]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise CurateError(f"{path}: task(s) listed twice: {', '.join(sorted(dup))}")
    return rows


def main_value(r: dict) -> float | None:
    """The value of a result line's main metric.

    The evaluator (benchmark/evaluate.py) names the metric in ``main_metric`` and stores the value in
    ``metrics[main_metric]``; a numeric ``main_metric`` (the value itself) is accepted too. None means the
    task was not scored (its data was absent) or was scored on a partial eval set (``"partial": true``,
    written only under ``curate evaluate --allow-partial``): a partial score is never a full one, so averages,
    bundles, the leaderboard and ``curate compare`` all leave it out. Raises ValueError for a value that is
    not a finite number.
    """
    mm = r.get("main_metric")
    if isinstance(mm, str):
        metrics = r.get("metrics")
        v = metrics.get(mm) if isinstance(metrics, dict) else None
        where = f"metrics[{mm!r}]"
    else:
        v, where = mm, "main_metric"
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{where} = {v!r} is not a finite number")
    return None if is_partial(r) else float(v)


def is_partial(r: dict) -> bool:
    """Whether a result line was scored on a partial eval set (fewer or more items than expected)."""
    return r.get("partial") is True


def average_score(results: list[dict]) -> tuple[float | None, list[str]]:
    """DataComp's average: unweighted mean of the main metrics of the tasks that were scored.

    Tasks present without a main metric (data absent) are returned as missing, never counted as 0.
    """
    values = {r["key"]: main_value(r) for r in results}
    scored = [v for v in values.values() if v is not None]
    missing = sorted(k for k, v in values.items() if v is None)
    return (float(np.mean(scored)) if scored else None), missing


def first(d: dict, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return default
