"""Does filtering beat no filtering at equal compute on the small or full offline pool at `tiny` scale (the demo's recipes)?

Runs the demo (offline pool -> download -> filtering network -> embed) and its three recipes with several seeds
each, every run training for the same number of samples seen (the scale fixes it), then prints per recipe: the
offline-suite average as mean ± sample std over seeds, the subset size, per-task means, and the wall time.
`no_filter` is the baseline measured side by side in the same leaderboard.

    .venv/bin/python -m perf.demo_experiment --work work --seeds 0,1,2

Resumable like the demo: finished runs are reused, so adding a seed only trains the new runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def main(argv: list[str] | None = None) -> dict:
    from benchmark.leaderboard import compare, connect, format_compare, format_standings, standings
    from curate.run.demo import DemoConfig, demo
    from curate.run.pipeline import parse_seeds

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("work"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--size", default="full", choices=["full", "small"])
    ap.add_argument("--scale", default="tiny")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    s = demo(DemoConfig(work=args.work, size=args.size, scale=args.scale, seeds=parse_seeds(args.seeds),
                        progress=False))
    wall = time.perf_counter() - t0
    db = Path(s["db"])
    rows = standings(db, args.scale)
    con = connect(db, read_only=True)
    per_task = con.execute(
        "SELECT name, key, avg(score), stddev_samp(score), count(*) FROM results WHERE scale = ? "
        "GROUP BY name, key ORDER BY name, key", [args.scale]).fetchall()
    con.close()
    print(format_standings(rows))
    print()
    print(f"{'recipe':<24} {'task':<28} {'mean':>8} {'std':>8} {'seeds':>5}")
    for name, key, m, sd, n in per_task:
        print(f"{name:<24} {key:<28} {m:8.4f} {(sd if sd is not None else float('nan')):8.4f} {n:5d}")
    for r in rows:
        if r.name != "no_filter" and any(x.name == "no_filter" for x in rows):
            print()
            print(format_compare("no_filter", r.name, compare(db, "no_filter", r.name, args.scale)))
    train_s = [st["seconds"] for st in s["stages"] if st["stage"].startswith("train ")]
    out = {"wall_seconds_this_invocation": round(wall, 1), "stages": s["stages"],
           "train_seconds": train_s, "standings": [r.__dict__ for r in rows]}
    print(f"\nwall time of this invocation: {wall:.0f} s; train stages: {', '.join(f'{x:.0f}' for x in train_s)} s")
    (Path(args.work) / "filtering_experiment.json").write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
