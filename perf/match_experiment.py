"""The fourth pre-registered run of issue 19: does filtering by scorer v2's match_score make a better nano subset?

    .venv/bin/python -m perf.match_experiment --work /work/exp                # every cell (resumable)
    .venv/bin/python -m perf.match_experiment --work /work/exp --report-only

Why: the third run (perf/mrr_experiment.py) found CLIP-30% by itm_score (held-out caption-swap ROC AUC 0.73-0.76)
above random and no_filter. The pool matcher's match_score (curate/run/matcher.py) reaches 0.922 on the same rows;
its top 30% keeps 18 of the pool's 8,187 swapped captions where itm_score's keeps 604. Whether that shows at nano
is measured here, with the design fixed before the first cell:

* entries: no_filter, match_30pct (recipes/offline/match_30pct.yaml), random, clip_itm_30pct (itm_score's top
  30%); both score recipes read the scorer v2 that `perf.filtering_experiment.scorer` trains in WORK (seed 0,
  its matcher included), random is the first run's control (draw seed 0, the CLIP-30% subset's size);
* seeds 30-34, disjoint from every earlier run (0-2, 10-14, 20-29) and the calibrations (1000, 1001); every entry
  on every seed, the cells of one seed before the next seed's. If the session's clock stops the run early, the
  finished cells are reported as incomplete; the seeds are never changed;
* headline: the third run's (mean MRR over the calibration-v2-admitted headline tasks with >= 1,000 items);
* statistics: benchmark.compare's two-sample t over seeds (pooled seed variance, 95%), Holm within each family:
  the match family (match_30pct - no_filter, match_30pct - random, match_30pct - clip_itm_30pct) and the
  replication family (clip_itm_30pct - no_filter, clip_itm_30pct - random: the third run's pass 2 again on new
  seeds and a re-trained scorer); paired-by-seed t intervals and per-seed item bootstraps beside them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from perf import confirm_experiment as CE
from perf import filtering_experiment as FE
from perf import mrr_experiment as ME
from perf import nano_bench as NB

HERE = Path(__file__).resolve().parent
REPORT = HERE / "match_experiment.json"
SEEDS = list(range(30, 35))
NAMES = ("no_filter", "match_30pct", "random", "clip_itm_30pct")
MATCH = [("no_filter", "match_30pct"), ("random", "match_30pct"), ("clip_itm_30pct", "match_30pct")]
REPLICATION = [("no_filter", "clip_itm_30pct"), ("random", "clip_itm_30pct")]
RULES = {"no_filter": FE.ENTRIES["no_filter"][2], "random": FE.ENTRIES["random"][2],
         "clip_itm_30pct": FE.ENTRIES["clip_itm_30pct"][2],
         "match_30pct": "recipes/offline/match_30pct.yaml (top 30% by scorer v2's match_score, the pool matcher)"}


def design(cal: dict) -> dict:
    heads = ME.headline(cal)
    if not heads:
        raise SystemExit(f"{ME.CALIBRATION}: no admitted task has >= {ME.MIN_ITEMS} items; this design has no headline")
    d = {
        "question": "does the top 30% by match_score (held-out caption-swap AUC 0.92) beat no_filter, random and the "
                    "top 30% by itm_score (0.76) at nano, scored by MRR?",
        "scale": NB.SCALE,
        "pool": "curate pool build-offline --size large --seed 0, downloaded at 64 px (rebuilt 2026-12-02)",
        "seeds": SEEDS,
        "entries": {n: {"rule": RULES[n]} for n in NAMES},
        "scorer": "perf.filtering_experiment.scorer: curate train-scorer --variant itm --seed 0 (bootstrap CLIP, ITM "
                  "head, pool matcher cross-fitted x4)",
        "families": {"match": [f"{b} - {a}" for a, b in MATCH],
                     "replication": [f"{b} - {a}" for a, b in REPLICATION]},
        "control_size": f"floor({FE.FRACTION} x downloaded rows); draw seed {FE.CONTROL_SEED}",
        **ME.measure(cal, heads),
    }
    d["digest"] = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()
    return d


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="work folder with pool, pool_build, evalsets")
    ap.add_argument("--report", type=Path, default=REPORT)
    ap.add_argument("--report-only", action="store_true", help="recompute the analysis from finished cells")
    args = ap.parse_args(argv)
    work = args.work.absolute()
    d = design(FE.calibration(ME.CALIBRATION))
    subsets = {}
    if not args.report_only:
        report = json.loads(args.report.read_text()) if args.report.is_file() else {}
        report = FE.lock_design(report, d, NB.git_commit())  # before the scorer and the first cell
        FE._save(args.report, report)
        sc = FE.scorer(work, report)  # trained once; a resumed run reuses it
        pretrained = {sc["arch"]: sc["out"], f"{sc['arch']}-itm": sc["itm_head"]}
        subsets = {n: FE.recipe_subset(work, n, pretrained) for n in ("match_30pct", "clip_itm_30pct")}
        FE._save(args.report, report)  # the scorer record (its AUCs) beside the design
    report = CE.run_design(work, args.report, d, NAMES, MATCH, args.report_only, subsets=subsets)
    pre = report["preregistration"]
    done = [s for s in pre["seeds"] if all(f"{n}/{s}" in report.get("cells", {}) for n in NAMES)]
    if done != pre["seeds"]:  # stopped early by the clock: analyse the seeds every entry finished, say so
        report["incomplete"] = {"seeds_analysed": done, "seeds_pending": [s for s in pre["seeds"] if s not in done]}
        report = {**report, "preregistration": {**pre, "seeds": done}}
        report["comparisons"] = FE.analyse(report, work, MATCH) if len(done) > 1 else []
        report["preregistration"] = pre
    else:
        report.pop("incomplete", None)
    report["comparisons_replication"] = FE.analyse({**report, "preregistration": {**pre, "seeds": done}}, work,
                                                   REPLICATION) if len(done) > 1 else []
    FE._save(args.report, report)
    for c in report["comparisons"] + report["comparisons_replication"]:
        print(f"{c['comparison']}: {c['diff']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] p Holm {c['p_holm']:.3g} "
              f"{c['verdict']}")
    return report


if __name__ == "__main__":
    main()
