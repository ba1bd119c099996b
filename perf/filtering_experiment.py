"""Can the laptop-scale benchmark see data quality? DataComp's baselines and three truth-built controls, ranked with
intervals on the large offline pool at the `nano` scale (issue 19).

    .venv/bin/python -m perf.filtering_experiment --work /work/exp            # pass 1: the key cells
    .venv/bin/python -m perf.filtering_experiment --work /work/exp --pass 2   # the other baselines (resumes)
    .venv/bin/python -m perf.filtering_experiment --work /work/exp --report-only

Design (fixed in PREREGISTRATION below and written into perf/filtering_experiment.json before the first final
cell; a resumed run refuses to start when the design it would run differs from the recorded one):

* every entry trains `nano` (benchmark/scales.py) for the same samples seen (40,960), so a smaller subset is seen
  more often, as in DataComp;
* *controls* are built from truth.parquet (never by a recipe): **oracle** (rows with no recorded noise of any kind),
  **random** (uniform over downloaded rows), **adversarial** (rows with injected caption noise first -- swapped,
  empty, boilerplate and non-English captions -- topped up at random); each the size of the CLIP-score 30% subset,
  floor(0.3 x downloaded rows), drawn with a fixed seed;
* *recipes* are DataComp's baselines as offline recipes under recipes/offline/, each citing its rule; their scorer is
  `curate train-scorer --variant itm` (scorer v2), its AUC recorded beside the results;
* the headline is the mean main metric over the suite v2 tasks that calibration admitted (perf/calibrate_nano.py,
  seeds >= 1000, rule stated there before it ran) among SUITE_V2_HEADLINE (in-domain + style shift);
* statistics: each pre-registered comparison B - A by `benchmark.compare` in seeds mode (two-sample t over seeds
  with pooled seed variance, 95%), p-values Holm-corrected within each family (average, groups, tasks) over all
  pre-registered comparisons; beside it, the paired-by-seed t interval (the same seed gives both entries the same
  initial weights) and each seed pair's item-level paired bootstrap. No optional stopping: the seeds are fixed.

Cells run in RUN_ORDER's groups, each seed-major (no_filter, oracle, adversarial for seeds 0, 1, 2; then random;
then, after scorer v2 is trained once, the scorer's recipes; pass 2 last), so a run stopped early holds complete
seed sets of the comparisons that matter most; a killed run resumes at the next unfinished cell (finished runs and
evaluations are reused).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

from perf import nano_bench as NB

REPORT = Path(__file__).resolve().parent / "filtering_experiment.json"
CALIBRATION = Path(__file__).resolve().parent / "calibration_nano.json"
RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "offline"
FRACTION = 0.3
CONTROL_SEED = 0  # the draw of the random, oracle and adversarial subsets (fixed, not a training seed)
# truth.parquet noise kinds that corrupt the caption (the adversarial control takes these first)
CAPTION_NOISE = ("caption_swap", "empty_caption", "boilerplate", "non_english")

# name -> (kind, pass, rule). Pass 1 = the key cells (issue 19: <= 100 min on 2 idle cores); pass 2 = the others.
ENTRIES: dict[str, tuple[str, int, str]] = {
    "no_filter": ("recipe", 1, "recipes/offline/no_filter.yaml: every downloaded row (DataComp 'No filtering')"),
    "oracle": ("control", 1, "truth.parquet noise == 'none' (no recorded noise of any kind), uniform draw of the "
               "CLIP-30% size"),
    "random": ("control", 1, "uniform draw of the CLIP-30% size from the downloaded rows"),
    "adversarial": ("control", 1, f"rows whose truth.parquet noise is one of {list(CAPTION_NOISE)} first, topped up "
                    "by a uniform draw to the CLIP-30% size"),
    "clip_itm_30pct": ("recipe", 1, "recipes/offline/clip_itm_30pct.yaml: top 30% by scorer v2's itm_score "
                       "(DataComp 'CLIP score 30%')"),
    "basic": ("recipe", 2, "recipes/offline/basic.yaml (DataComp 'Basic filtering' without its 200 px rule)"),
    "text_based": ("recipe", 2, "recipes/offline/text_based.yaml (DataComp 'Text-based', WordNet / ImageNet-21k)"),
    "image_based": ("recipe", 2, "recipes/offline/image_based.yaml (DataComp 'Image-based', target = the trusted "
                    "subset's images)"),
    "image_based_x_clip_itm_30pct": ("recipe", 2, "recipes/offline/image_based_x_clip_itm_30pct.yaml"),
    "dedup_clip_itm_30pct": ("recipe", 2, "recipes/offline/dedup_clip_itm_30pct.yaml"),
    "clip_itm_30pct_knowledge": ("recipe", 2, "recipes/offline/clip_itm_30pct_knowledge.yaml (K-LITE step)"),
}
# The order cells run in (it changes no result, only what a stopped run already holds): the entries of the two
# comparisons that say whether the benchmark sees quality at all, then random, then the scorer's recipes.
RUN_ORDER = (("no_filter", "oracle", "adversarial"), ("random",), ("clip_itm_30pct",))
# (A, B): the report gives B - A. Pass-2 baselines are each compared with no_filter.
COMPARISONS: list[tuple[str, str]] = [
    ("no_filter", "oracle"), ("no_filter", "adversarial"), ("random", "clip_itm_30pct"),
    ("no_filter", "clip_itm_30pct"),
] + [("no_filter", n) for n, (_, p, _) in ENTRIES.items() if p == 2]

PREREGISTRATION = {
    "question": "does the nano-scale benchmark rank a known-better subset above a known-worse one, and where do "
                "DataComp's baselines fall, on the large offline pool?",
    "scale": NB.SCALE,
    "pool": "curate pool build-offline --size large --seed 0, served on 127.0.0.1 and downloaded at 64 px",
    "seeds": [0, 1, 2],
    "entries": {n: {"kind": k, "pass": p, "rule": r} for n, (k, p, r) in ENTRIES.items()},
    "comparisons": [f"{b} - {a}" for a, b in COMPARISONS],
    "control_size": f"floor({FRACTION} x downloaded rows), the CLIP-30% subset's size; draw seed {CONTROL_SEED}",
    "scorer": {"command": "curate train-scorer --variant itm --trusted POOL_BUILD/trusted.parquet --seed 0",
               "score": "itm_score", "auc": "measured on rows held out of every scorer training stage"},
    "statistics": {"primary": "benchmark.compare seeds mode: two-sample t over seeds, pooled seed variance, 95%; "
                              "Holm within each family (average, groups, tasks) over the pre-registered comparisons",
                   "secondary": ["paired-by-seed t interval of the headline difference (95%)",
                                 "item-level paired bootstrap per seed pair (benchmark.stats.paired_suite)"]},
    "headline": "unweighted mean main metric over the calibration-admitted tasks of SUITE_V2_HEADLINE",
    "samples_seen": "fixed by the nano scale (40,960)",
}


# ---------------------------------------------------------------------------------------------- design


def calibration(path: Path = CALIBRATION) -> dict:
    if not path.is_file():
        raise SystemExit(f"{path}: no calibration; run `python -m perf.calibrate_nano --work WORK` first "
                         "(it admits the tasks the headline uses)")
    return json.loads(path.read_text())


def design(cal: dict) -> dict:
    """The pre-registration block for this calibration (its digest pins it)."""
    d = dict(PREREGISTRATION)
    d["suite"] = {"tasks": cal["admitted"], "headline": cal["headline_admitted"],
                  "calibration": {"rule": cal["rule"], "seeds": cal["seeds"], "commit": cal.get("commit"),
                                  "created": cal.get("created")}}
    d["digest"] = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()
    return d


def lock_design(report: dict, d: dict, commit: str) -> dict:
    """Record the design before the first final cell; refuse to run a different one on resume."""
    old = report.get("preregistration")
    if old is None:
        report["preregistration"] = {**d, "commit": commit, "registered": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                        time.gmtime())}
        return report
    if old.get("digest") != d["digest"]:
        changed = sorted(k for k in set(old) | set(d) if k not in ("digest", "commit", "registered")
                         and old.get(k) != d.get(k))
        raise SystemExit(f"the pre-registered design differs from this run's in {', '.join(changed) or 'its digest'}; "
                         "the experiment refuses to change it (start a new report file to run another design)")
    return report


# ---------------------------------------------------------------------------------------------- subsets


def control_subsets(truth: Path, downloaded: list[str], fraction: float = FRACTION,
                    seed: int = CONTROL_SEED) -> dict[str, tuple[list[str], dict]]:
    """oracle / random / adversarial uid lists of size floor(fraction x downloaded), from truth.parquet."""
    import numpy as np
    import pyarrow.parquet as pq

    t = pq.read_table(truth, columns=["uid", "noise"]).to_pydict()
    noise = dict(zip(t["uid"], t["noise"]))
    rows = sorted(downloaded)
    k = int(np.floor(len(rows) * fraction + 1e-9))
    rng = np.random.default_rng(seed)
    clean = [u for u in rows if noise.get(u) == "none"]
    bad = [u for u in rows if noise.get(u) in CAPTION_NOISE]
    if len(clean) < k:
        raise SystemExit(f"{truth}: only {len(clean)} clean downloaded rows, fewer than the control size {k}")
    oracle = sorted(rng.choice(clean, size=k, replace=False).tolist())
    random_ = sorted(np.random.default_rng(seed + 1).choice(rows, size=k, replace=False).tolist())
    first = bad if len(bad) <= k else sorted(np.random.default_rng(seed + 2).choice(bad, size=k, replace=False).tolist())
    rest = sorted(set(rows) - set(first))
    top = np.random.default_rng(seed + 3).choice(rest, size=k - len(first), replace=False).tolist() if k > len(first) else []
    adversarial = sorted(first + top)

    def kinds(uids):
        out: dict[str, int] = {}
        for u in uids:
            out[noise.get(u) or "unknown"] = out.get(noise.get(u) or "unknown", 0) + 1
        return dict(sorted(out.items()))

    return {name: (u, {"size": len(u), "of_downloaded": len(rows), "noise": kinds(u)})
            for name, u in (("oracle", oracle), ("random", random_), ("adversarial", adversarial))}


def recipe_subset(work: Path, name: str, pretrained: dict[str, str]) -> Path:
    """`curate filter --recipe recipes/offline/NAME.yaml` into WORK/subsets/NAME (skips when up to date)."""
    from curate.filter.engine import FilterConfig, filter_pool

    out = work / "subsets" / name
    filter_pool(FilterConfig(recipe=str(RECIPES / f"{name}.yaml"), pool=str(work / "pool"), out=str(out),
                             pretrained=pretrained, progress=False))
    return out


# ---------------------------------------------------------------------------------------------- analysis


def _side(label: str, runs: list[str], keys: list[str]):
    from benchmark.compare import load_paths

    side = load_paths(",".join(runs))
    side.label = label
    for s in side.seeds:
        s.results = {k: v for k, v in s.results.items() if k in keys}
    return side


def analyse(report: dict, work: Path, comparisons: list[tuple[str, str]] | None = None) -> list[dict]:
    """Every pre-registered comparison whose both entries have all seeds, Holm-corrected together."""
    import numpy as np

    from benchmark import compare as C
    from benchmark import stats as S

    pre = report["preregistration"]
    keys, seeds = pre["suite"]["headline"], pre["seeds"]
    cells = report.get("cells", {})

    def runs(name):
        got = [cells.get(f"{name}/{s}") for s in seeds]
        return None if any(c is None for c in got) else got

    reps, extra = [], []
    for a, b in (COMPARISONS if comparisons is None else comparisons):
        ra, rb = runs(a), runs(b)
        if ra is None or rb is None:
            continue
        rep = C.compare_sides(_side(a, [c["run"] for c in ra], keys), _side(b, [c["run"] for c in rb], keys))
        ha = np.array([np.mean([c["scores"][k] for k in keys]) for c in ra])
        hb = np.array([np.mean([c["scores"][k] for k in keys]) for c in rb])
        m, lo, hi = S.t_interval(hb - ha)
        paired = {"diff_per_seed": (hb - ha).round(5).tolist(), "mean": float(m), "low": float(lo), "high": float(hi),
                  "method": "paired t over seeds (95%)"}
        items = []
        for ca, cb, sd in zip(ra, rb, seeds):
            sa, sb = _side(a, [ca["run"]], keys), _side(b, [cb["run"]], keys)
            pairs = [C.paired_cells(sa.seeds[0], sb.seeds[0], k) for k in keys]
            d = S.paired_suite(pairs, seed=sd)
            items.append({"seed": sd, "diff": d.estimate, "low": d.low, "high": d.high, "p": d.p_value})
        reps.append(rep)
        extra.append({"paired_seeds": paired, "items_per_seed": items})
    C.apply_holm(reps)
    out = []
    for rep, ex in zip(reps, extra):
        avg = next(r for r in rep["rows"] if r["kind"] == "average")
        groups = {r["name"]: {k: r[k] for k in ("mean_a", "mean_b", "diff", "low", "high", "p", "p_holm", "verdict")}
                  for r in rep["rows"] if r["kind"] == "group"}
        out.append({"comparison": f"{rep['b']} - {rep['a']}", "a": rep["a"], "b": rep["b"],
                    "mean_a": avg["mean_a"], "mean_b": avg["mean_b"], "diff": avg["diff"], "low": avg["low"],
                    "high": avg["high"], "p": avg["p"], "p_holm": avg["p_holm"], "verdict": avg["verdict"],
                    "seeds_needed": avg["seeds_needed"], "seed_sd": avg["seed_sd"], "groups": groups,
                    "tasks": {r["name"]: {k: r[k] for k in ("diff", "low", "high", "p_holm")}
                              for r in rep["rows"] if r["kind"] == "task"}, **ex})
    return out


def entry_table(report: dict) -> list[dict]:
    """Per entry: headline and group means with a 95% t interval over seeds."""
    import numpy as np

    from benchmark import stats as S
    from benchmark.tasks import SUITE_V2_GROUPS

    pre = report["preregistration"]
    keys = pre["suite"]["headline"]
    rows = []
    for name in pre["entries"]:
        cs = [c for c in report.get("cells", {}).values() if c["name"] == name]
        if not cs:
            continue
        row = {"entry": name, "seeds": sorted(c["seed"] for c in cs), "subset_rows": cs[0].get("subset_rows")}
        units = [("headline", keys)] + [(g, [k for k in ks if k in keys]) for g, ks in SUITE_V2_GROUPS.items()]
        for g, gkeys in units:
            if not gkeys:
                continue
            v = np.array([np.mean([c["scores"][k] for k in gkeys]) for c in cs])
            if len(v) > 1:
                m, lo, hi = S.t_interval(v)
                row[g] = {"mean": float(m), "low": float(lo), "high": float(hi)}
            else:
                row[g] = {"mean": float(v[0]), "low": None, "high": None}
        rows.append(row)
    return rows


def format_tables(report: dict) -> str:
    lines = ["| entry | rows | seeds | headline mean [95% CI] | in-domain | style shift |", "|---|---|---|---|---|---|"]

    def f(x):
        if not x:
            return "-"
        return f"{x['mean']:.4f}" + (f" [{x['low']:.4f}, {x['high']:.4f}]" if x.get("low") is not None else "")

    for r in report.get("entries_table", []):
        lines.append(f"| {r['entry']} | {r['subset_rows']:,} | {len(r['seeds'])} | {f(r.get('headline'))} | "
                     f"{f(r.get('in_domain'))} | {f(r.get('style_shift'))} |")
    lines += ["", "| comparison | diff [95% CI] (two-sample t) | p (Holm) | paired-by-seed [95% CI] | verdict |",
              "|---|---|---|---|---|"]
    for c in report.get("comparisons", []):
        ps = c["paired_seeds"]
        lines.append(f"| {c['comparison']} | {c['diff']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] | "
                     f"{c['p_holm']:.3g} | {ps['mean']:+.4f} [{ps['low']:+.4f}, {ps['high']:+.4f}] | {c['verdict']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


def _save(path: Path, report: dict) -> None:
    from curate.core import atomic

    atomic.write_json(path, report)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("work/nano"))
    ap.add_argument("--pass", dest="pass_", type=int, default=1, choices=[1, 2],
                    help="1: the key cells; 2: also the other baselines")
    ap.add_argument("--report", type=Path, default=REPORT)
    ap.add_argument("--report-only", action="store_true", help="recompute the analysis from finished cells")
    ap.add_argument("--only", default=None, help="comma-separated entries to run now (others wait; design unchanged)")
    args = ap.parse_args(argv)
    from benchmark.tasks import OFFLINE_V2_KEYS

    work = args.work.absolute()
    report = json.loads(args.report.read_text()) if args.report.is_file() else {}
    d = design(calibration())
    if not args.report_only:
        report = lock_design(report, d, NB.git_commit())
        _save(args.report, report)
        report.setdefault("prepare", NB.prepare(work))
        downloaded = NB.success_uids(work / "pool")
        subsets: dict[str, Path] = {}
        for name, (uids, counts) in control_subsets(work / "pool_build" / "truth.parquet", downloaded).items():
            NB.write_subset(work / "subsets" / name, uids, work / "pool", name, ENTRIES[name][2], counts)
            subsets[name] = work / "subsets" / name
            report.setdefault("controls", {})[name] = counts
        wanted = [n for n, (_, p, _) in ENTRIES.items() if p <= args.pass_]
        if args.only:
            wanted = [n for n in wanted if n in args.only.split(",")]
        # RUN_ORDER: groups run one after the other, each seed-major; the scorer is trained once, before its group
        groups = [[n for n in wanted if n in g] for g in RUN_ORDER] + [[n for n in wanted if not any(n in g for g in RUN_ORDER)]]
        order = [(s, n) for group in groups for s in report["preregistration"]["seeds"] for n in group]
        for seed, name in order:
            cell = f"{name}/{seed}"
            if cell in report.get("cells", {}):
                continue
            if name not in subsets:
                subsets[name] = prepare_recipe(work, report, name)
            rec = NB.run_cell(work, subsets[name], name, seed, OFFLINE_V2_KEYS)
            rec["commit"] = NB.git_commit()
            report.setdefault("cells", {})[cell] = rec
            _save(args.report, report)
            print(f"{cell}: headline {np_mean(rec, report):.4f}  train {rec['train_seconds']} s  eval "
                  f"{rec['eval_seconds']} s  {rec['cpu_seconds']} CPU-s  load {rec['load_start']}->{rec['load_end']}",
                  flush=True)
    report["entries_table"] = entry_table(report)
    report["comparisons"] = analyse(report, work)
    _save(args.report, report)
    print(format_tables(report))
    return report


def needs_scorer(name: str) -> bool:
    """Recipes whose steps read scorer v2's embeddings (every recipe here but no_filter, basic and text_based)."""
    return ENTRIES[name][0] == "recipe" and name not in ("no_filter", "basic", "text_based")


def np_mean(rec: dict, report: dict) -> float:
    keys = report["preregistration"]["suite"]["headline"]
    return sum(rec["scores"][k] for k in keys) / len(keys)


def prepare_recipe(work: Path, report: dict, name: str) -> Path:
    """The recipe's filter; for a recipe that reads scores, scorer v2 (trained once) and its embeddings first."""
    if not needs_scorer(name):
        return recipe_subset(work, name, {})
    sc = scorer(work, report)
    if "image_based" in name:
        trusted_target(work, sc)
    # the bootstrap CLIP's embeddings (dedup, image_based) and the ITM head's itm_score folder
    return recipe_subset(work, name, {sc["arch"]: sc["out"], f"{sc['arch']}-itm": sc["itm_head"]})


def scorer(work: Path, report: dict) -> dict:
    """Train scorer v2 (`curate train-scorer --variant itm`: bootstrap CLIP + ITM head), embed the pool with it and
    record its AUCs on the held-out rows, once (a resumed run reuses it)."""
    if "scorer" in report and Path(report["scorer"]["out"]).is_file():
        return report["scorer"]
    from curate.run.scorer import ScorerConfig, train_scorer

    b = work / "pool_build"
    t0, c0 = time.perf_counter(), NB.cpu_seconds()
    s = train_scorer(ScorerConfig(pool=work / "pool", out=work / "scorer" / "scorer_itm.pt", truth=b / "truth.parquet",
                                  trusted=b / "trusted.parquet", scale="tiny", seed=0, variant="itm", progress=False))
    rec = {k: s.get(k) for k in ("out", "arch", "variant", "itm_head", "scores_model_id", "model_id", "heldout_rule",
                                 "trusted_rows", "report", "itm", "stages")}
    rec.update(seconds=round(time.perf_counter() - t0, 1), cpu_seconds=round(NB.cpu_seconds() - c0, 1),
               load_end=NB.load())
    report["scorer"] = rec
    return rec


def trusted_target(work: Path, sc: dict) -> Path:
    """POOL/targets/trusted_image_emb.npy: the image embeddings (scorer v2's CLIP) of the trusted subset, the
    image-based baseline's held-in target set (never evaluation images)."""
    import numpy as np
    import pyarrow.parquet as pq

    from curate.core.atomic import atomic_path
    from curate.run import itm

    dest = work / "pool" / "targets" / "trusted_image_emb.npy"
    if dest.is_file():
        return dest
    trusted = set(pq.read_table(work / "pool_build" / "trusted.parquet", columns=["uid"]).column("uid").to_pylist())
    _, uids, img, _ = itm.load_embeddings(work / "pool", sc["model_id"])
    flat = np.concatenate(uids)
    keep = np.fromiter((u in trusted for u in flat), bool, count=len(flat)) & np.isfinite(img).all(axis=1)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest, suffix=".npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, img[keep].astype(np.float32))
    return dest


if __name__ == "__main__":
    main()
