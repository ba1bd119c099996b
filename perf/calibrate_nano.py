"""Calibrate suite v2 at the `nano` scale: which tasks can the laptop-scale benchmark measure at all?

The rule is fixed here, before the run, and is not tuned after it (issue 17 item 7):

    A task is ADMITTED when the lower end of the 95% item-level interval of its main metric, for the `nano`
    scale trained on the pool's trusted subset (POOL_BUILD/trusted.parquet: the rows whose *source* has curated
    captions -- never truth.parquet), exceeds 2x the task's chance level computed from the built set.

The trained model is the best case the benchmark's protocol can reach on this pool with clean data, so a task
that stays near chance even then cannot rank curation recipes and is dropped from the headline. Seeds are
>= 1000, disjoint from every experiment seed (perf.filtering_experiment uses 0-9). Out-of-domain tasks are
calibrated and reported too, but they are never in the headline (benchmark/tasks.py SUITE_V2_HEADLINE).

    .venv/bin/python -m perf.calibrate_nano --work /work/exp            # one seed (1000)
    .venv/bin/python -m perf.calibrate_nano --work /work/exp --seeds 1000,1001

Writes perf/calibration_nano.json (read by perf.filtering_experiment) and prints the table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from perf import nano_bench as NB

RULE = ("admitted when the lower 95% item-level bound of nano trained on the trusted subset (by source) exceeds "
        "2x the task's chance level (computed from the built set)")
FACTOR = 2.0
OUT = Path(__file__).resolve().parent / "calibration_nano.json"


def trusted_subset(work: Path) -> tuple[list[str], dict]:
    """Downloaded rows of POOL_BUILD/trusted.parquet (source-defined)."""
    import pyarrow.parquet as pq

    trusted = set(pq.read_table(work / "pool_build" / "trusted.parquet", columns=["uid"]).column("uid").to_pylist())
    ok = NB.success_uids(work / "pool")
    uids = [u for u in ok if u in trusted]
    return uids, {"trusted_rows": len(trusted), "trusted_downloaded": len(uids)}


def main(argv: list[str] | None = None) -> dict:
    from benchmark.tasks import OFFLINE_V2_KEYS, SUITE_V2_HEADLINE
    from curate.core import atomic

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("work/nano"))
    ap.add_argument("--seeds", default="1000")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    if any(s < 1000 for s in seeds):
        raise SystemExit("calibration seeds must be >= 1000 (disjoint from the experiment's)")
    t0 = time.perf_counter()
    prep = NB.prepare(args.work)
    uids, counts = trusted_subset(args.work)
    subset = args.work / "subsets" / "calibration_trusted"
    NB.write_subset(subset, uids, args.work / "pool", "calibration_trusted",
                    "POOL_BUILD/trusted.parquet (rows of curated-caption sources), downloaded", counts)
    chance = NB.chance_levels(args.work / "evalsets", OFFLINE_V2_KEYS)
    runs = []
    for seed in seeds:
        rec = NB.run_cell(args.work, subset, "calibration_trusted", seed, OFFLINE_V2_KEYS)
        rec["intervals"] = NB.item_intervals(Path(rec["run"]))
        runs.append(rec)
        print(f"seed {seed}: train {rec['train_seconds']} s, eval {rec['eval_seconds']} s, "
              f"{rec['cpu_seconds']} CPU-s, load {rec['load_start']} -> {rec['load_end']}", flush=True)
    tasks = {}
    for k in OFFLINE_V2_KEYS:
        lows = [r["intervals"].get(k, {}).get("low") for r in runs]
        ests = [r["intervals"].get(k, {}).get("estimate") for r in runs]
        c = chance[k]
        ok = c is not None and all(lo is not None and lo > FACTOR * c for lo in lows)
        tasks[k] = {"chance": c, "estimate": ests, "low": lows, "admitted": bool(ok),
                    "headline": k in SUITE_V2_HEADLINE}
    admitted = [k for k in OFFLINE_V2_KEYS if tasks[k]["admitted"]]
    out = {"rule": RULE, "factor": FACTOR, "scale": NB.SCALE, "seeds": seeds, "subset": counts, "prepare": prep,
           "tasks": tasks, "admitted": admitted,
           "headline_admitted": [k for k in SUITE_V2_HEADLINE if k in admitted],
           "runs": runs, "commit": NB.git_commit(), "seconds": round(time.perf_counter() - t0, 1),
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic.write_json(args.out, out)
    print(f"\nrule: {RULE}\n")
    print("| task | chance | nano on trusted subset (item 95% interval) | admitted |")
    print("|---|---|---|---|")
    for k, t in tasks.items():
        iv = ", ".join(f"{e:.3f} [{lo:.3f}, {r['intervals'][k]['high']:.3f}]" for e, lo, r in zip(t["estimate"], t["low"], runs)
                       if e is not None)
        c = "unknown" if t["chance"] is None else f"{t['chance']:.4f}"
        print(f"| {k} | {c} | {iv} | {'yes' if t['admitted'] else 'no'} |")
    print(f"\nadmitted headline tasks: {len(out['headline_admitted'])} of {len(SUITE_V2_HEADLINE)}; wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
