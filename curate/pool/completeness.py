"""How complete a pool is: the share of its input rows that downloaded, read from what the pool already records.

Why: scores are only comparable between subsets of equally complete pools. DataComp users downloaded 78-94% of
the same pool and compared anyway; a recipe run on the 78% copy sees fewer (and differently biased) candidates.
So the share travels with a result (submission bundles, the leaderboard) and `curate compare` warns when two
entries' pools differ by more than a tolerance.

The share is computed, not stored again: `curate download` already writes POOL/pool.json with the status
counts of the pool's rows (`counts`) and the number of input rows (`input.rows`), so

    success_share = counts["success"] / input.rows

An imported DataComp pool (POOL/datacomp.json, `curate pool import-datacomp`) is released metadata that was
never downloaded here: nothing says how many of its images are still reachable, so its share is null with the
note "imported metadata: no download, completeness unknown". A pool with neither file is unknown as well.
"""

from __future__ import annotations

import json
from pathlib import Path

IMPORTED_NOTE = "imported metadata: no download, completeness unknown"
UNKNOWN_NOTE = "no pool.json: completeness unknown"


def pool_completeness(pool: str | Path | None) -> dict:
    """{"success_share": float|None, "success": int|None, "input_rows": int|None, "source": str, "note": str}.

    `source` is "download" (from pool.json), "datacomp_import", "missing" (the folder is gone) or "unknown".
    Never raises: a result must still be packable when its pool was moved; the note says why the share is null.
    """
    out = {"success_share": None, "success": None, "input_rows": None, "source": "unknown", "note": UNKNOWN_NOTE}
    if pool is None:
        out["note"] = "pool not recorded: completeness unknown"
        return out
    pool = Path(pool)
    if not pool.is_dir():
        out.update(source="missing", note=f"pool {pool} not found: completeness unknown")
        return out
    pj = pool / "pool.json"
    if pj.is_file():
        try:
            state = json.loads(pj.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            out["note"] = f"{pj} unreadable ({e}): completeness unknown"
            return out
        counts = state.get("counts") if isinstance(state, dict) else None
        rows = (state.get("input") or {}).get("rows") if isinstance(state, dict) else None
        if not isinstance(counts, dict) or not isinstance(rows, int) or rows <= 0:
            out["note"] = f"{pj} has no status counts or input row count (download not finished): completeness unknown"
            return out
        success = int(counts.get("success", 0))
        share = success / rows
        note = f"{success} of {rows} input rows downloaded"
        if state.get("state") != "complete":
            note += f" (pool state {state.get('state')!r})"
        out.update(success_share=share, success=success, input_rows=rows, source="download", note=note)
        return out
    if (pool / "datacomp.json").is_file():
        out.update(source="datacomp_import", note=IMPORTED_NOTE)
    return out
