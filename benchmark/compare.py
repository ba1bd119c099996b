"""`curate compare A B [C ...]`: is B better than A on this benchmark, by how much, how sure, and how many
seeds would settle it.

Each side is a recipe's trained models: RUN folders (or results files, or submission bundles), several
joined with commas for several seeds, or a submission name in the leaderboard (all its seeds). The first
side is the baseline; every other side is compared with it (B - A, C - A, ...).

* With at least 3 seeds in a comparison (2 + 1 or more), the recipe verdict comes from the seeds: a
  two-sample t with pooled seed variance per task, per DataComp group and on the average over the shared
  tasks (benchmark.stats.seed_difference), plus the seeds per side that 80% power needs to detect
  `--min-effect`.
* With one seed per side the seed variance is unknown and there is no recipe verdict. What can be said is
  whether *these two trained models* differ on these items: a paired bootstrap over the items (resampled
  jointly, from the per-item files `curate evaluate` writes).
* Only tasks scored by every seed of both sides, on the same eval set (same `evalset_fingerprint` where
  recorded), are compared; the rest are listed with the reason.
* p-values are Holm-corrected within each family (averages; groups; tasks) over all comparisons of the
  call, and verdicts use the corrected values.
* Scores are only comparable between subsets of equally complete pools: each side's pool completeness
  (bundle.json `pool_completeness`, or for a RUN folder the pool.json of the pool its subset's manifest
  names) is compared, and a gap above `completeness_tolerance` (default 2 points) is a WARNING line.

This module reads RUN folders and bundles itself and takes leaderboard rows from its caller
(benchmark.leaderboard opens the database and defines the click command), so the leaderboard's
`--compare` alias and `curate compare` share one analysis without the two modules importing each other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmark import stats as S
from benchmark.results import is_partial, main_value, read_json
from benchmark.results import read_results as read_result_lines
from curate.core.errors import CurateError

RESULTS_FILE = "eval_results.jsonl"
MIN_EFFECT = 0.005  # default smallest difference worth detecting (half a point; DataComp's seed sd ~0.006)
# Largest gap in pool completeness (share of the pool's input rows downloaded, curate.pool.completeness)
# between two compared entries before `curate compare` warns: DataComp users compared subsets of pools
# downloaded at 78-94%; two points is about the run-to-run variation of one download of the same URLs.
COMPLETENESS_TOLERANCE = 0.02
FAMILIES = ("average", "group", "task")


@dataclass
class Seed:
    """One trained model's results. `results_file` locates its per-item files (None: leaderboard rows)."""

    label: str
    results: dict[str, dict]
    seed: int | None = None
    recipe: str | None = None
    results_file: Path | None = None
    completeness: dict | None = None  # curate.pool.completeness of the pool the subset was filtered from


@dataclass
class Side:
    label: str
    seeds: list[Seed] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- loading

def _seed_from_path(p: Path) -> Seed:
    """A RUN folder, a bundle folder (bundle.json + results.jsonl) or a results .jsonl file."""
    if p.is_dir():
        if (p / RESULTS_FILE).is_file():
            info = read_json(p / "info.json", "run info") if (p / "info.json").is_file() else {}
            rfile = p / RESULTS_FILE
            return Seed(str(p), _by_key(rfile), info.get("seed"), info.get("subset_hash"), rfile,
                        _run_completeness(p, info))
        if (p / "bundle.json").is_file():
            decl = read_json(p / "bundle.json", "bundle declaration")
            rfile = p / "results.jsonl"
            return Seed(f"{decl.get('name', p.name)} seed {decl.get('seed')}", _by_key(rfile), decl.get("seed"),
                        decl.get("uids_sha256") or decl.get("recipe"), rfile,
                        decl.get("pool_completeness") if isinstance(decl.get("pool_completeness"), dict) else None)
        raise CurateError(f"{p}: neither a RUN folder ({RESULTS_FILE}) nor a submission bundle (bundle.json); "
                          f"run `curate evaluate --run {p}` first")
    if p.is_file():
        return Seed(str(p), _by_key(p), None, None, p)
    raise CurateError(f"{p}: not found")


def _run_completeness(run: Path, info: dict) -> dict | None:
    """The completeness of the pool a RUN's subset came from (its manifest names the pool), or None."""
    from benchmark.provenance import run_pool_completeness

    return run_pool_completeness(run, info)


def completeness_check(a: Side, b: Side, tolerance: float = COMPLETENESS_TOLERANCE) -> dict:
    """How complete each side's pool(s) were and whether they differ by more than `tolerance`.

    {"a": [shares], "b": [shares], "gap": max |a - b| or None, "tolerance", "warning": text or None}.
    A share that is unknown (imported DataComp metadata, a pool from before pool.json, a moved pool) gives a
    note instead: comparability cannot be checked.
    """
    def shares(side):
        return [None if not s.completeness else s.completeness.get("success_share") for s in side.seeds]

    sa, sb = shares(a), shares(b)
    out = {"a": sa, "b": sb, "gap": None, "tolerance": tolerance, "warning": None, "note": None}
    ka, kb = [x for x in sa if x is not None], [x for x in sb if x is not None]
    if ka and kb:
        gap = max(abs(x - y) for x in ka for y in kb)
        out["gap"] = gap
        if gap > tolerance:
            out["warning"] = (f"pool completeness differs by {gap:.1%} (A {min(ka):.1%}-{max(ka):.1%}, B "
                              f"{min(kb):.1%}-{max(kb):.1%} of the pool's input rows downloaded), more than the "
                              f"tolerance {tolerance:.1%}: the subsets were filtered from unequally complete pools, "
                              "so the scores are not directly comparable")
    if len(ka) < len(sa) or len(kb) < len(sb):
        why = sorted({(s.completeness or {}).get("note") or "not recorded" for s in a.seeds + b.seeds
                      if not s.completeness or s.completeness.get("success_share") is None})
        out["note"] = "pool completeness unknown for some entries (" + "; ".join(why)[:200] + "): comparability of " \
                      "the pools not checked"
    return out


def _by_key(path: Path) -> dict[str, dict]:
    return {r["key"]: r for r in read_result_lines(path)}


def load_paths(spec: str) -> Side:
    """A side given as one path or several joined with commas (one per seed of the same recipe)."""
    parts = [s for s in spec.split(",") if s.strip()]
    side = Side(spec, [_seed_from_path(Path(s.strip())) for s in parts])
    recipes = {s.recipe for s in side.seeds if s.recipe}
    if len(recipes) > 1:
        raise CurateError(f"{spec}: these runs trained on different subsets ({', '.join(sorted(recipes))[:200]}); "
                          "a side is one recipe's seeds")
    seeds = [s.seed for s in side.seeds if s.seed is not None]
    if len(seeds) != len(set(seeds)):
        raise CurateError(f"{spec}: the same seed appears twice; each run of a side must be a different seed")
    return side


def side_from_rows(label: str, rows: list[tuple]) -> Side:
    """A side from leaderboard rows (seed, key, metric, score, bundle path or None), one per seed x task.

    When the bundle folder still holds its results file, that is used (it carries eval-set fingerprints
    and locates item files); otherwise the leaderboard's main-metric scores."""
    by_seed: dict[int, dict] = {}
    bundles: dict[int, str | None] = {}
    for seed, key, metric, score, bundle in rows:
        by_seed.setdefault(int(seed), {})[key] = {"key": key, "main_metric": metric,
                                                  "metrics": {metric: score} if metric else {}}
        bundles[int(seed)] = bundle
    side = Side(label)
    for seed in sorted(by_seed):
        b = bundles[seed]
        rfile = Path(b) / "results.jsonl" if b else None
        if rfile is not None and rfile.is_file():
            try:
                results = _by_key(rfile)
            except CurateError:
                results, rfile = by_seed[seed], None
        else:
            results, rfile = by_seed[seed], None
        side.seeds.append(Seed(f"{label} seed {seed}", results, seed, None, rfile))
    return side


def load_side(spec: str, db_side=None) -> Side:
    """A path spec, else (when `db_side` is given) a leaderboard submission name via `db_side(name)`."""
    first = spec.split(",")[0].strip()
    if Path(first).exists() or db_side is None:
        return load_paths(spec)
    return db_side(spec)


# ------------------------------------------------------------------------------------------- analysis

def _fingerprints(side: Side, key: str) -> set:
    return {s.results[key].get("evalset_fingerprint") for s in side.seeds}


def shared_tasks(a: Side, b: Side) -> tuple[list[str], dict[str, str], list[str]]:
    """(keys compared, {key: why not compared}, keys whose eval-set fingerprint is not recorded)."""
    def scored(side):
        per_seed = [{k for k, r in s.results.items() if main_value(r) is not None} for s in side.seeds]
        return set.intersection(*per_seed), set.union(*per_seed)

    a_all, a_any = scored(a)
    b_all, b_any = scored(b)
    excluded, keys, unknown = {}, [], []
    for k in sorted(a_any | b_any):
        if k not in a_any:
            excluded[k] = "only in B"
        elif k not in b_any:
            excluded[k] = "only in A"
        elif k not in a_all or k not in b_all:
            excluded[k] = "not scored by every seed"
        else:
            metrics = {s.results[k].get("main_metric") for s in a.seeds + b.seeds}
            fa, fb = _fingerprints(a, k), _fingerprints(b, k)
            known = (fa | fb) - {None}
            if len(metrics) > 1:
                excluded[k] = f"different main metrics ({', '.join(sorted(map(str, metrics)))})"
            elif len(known) > 1:
                excluded[k] = f"different eval sets (fingerprints {', '.join(sorted(known))})"
            else:
                keys.append(k)
                if None in fa | fb:
                    unknown.append(k)
    for k in sorted({k for s in a.seeds + b.seeds for k, r in s.results.items() if is_partial(r)}):
        excluded[k] = "partial eval set (scored with --allow-partial): not a full score"  # main_value is None
    return keys, excluded, unknown


def _values(side: Side, keys: list[str]) -> np.ndarray:
    """(seeds, tasks) main-metric values."""
    return np.array([[main_value(s.results[k]) for k in keys] for s in side.seeds], dtype=np.float64)


def _groups(keys: list[str]) -> dict[str, list[int]]:
    from benchmark.tasks import TASKS

    out: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        for g in (TASKS[k].groups if k in TASKS else ()):
            out.setdefault(g, []).append(i)
    return out


def paired_cells(a: Seed, b: Seed, key: str):
    """PairedCells (B - A) of one task from both models' per-item files, aligned by item key."""
    from benchmark.evaluate import main_metric_cells, read_items, task_as_scored
    from benchmark.tasks import TASKS

    if key not in TASKS:
        raise CurateError(f"{key}: not a registered task; no item statistic")
    for s in (a, b):
        if s.results_file is None:
            raise CurateError(f"{s.label}: this leaderboard entry's bundle folder is gone, so no per-item results; "
                              "compare the RUN folders instead (`curate compare RUN_A RUN_B`)")
        # a bundle keeps its run's item files in BUNDLE/results.items/ (benchmark/submit.py), read like a RUN's
        if (s.results_file.parent / "bundle.json").is_file() and not s.results_file.with_suffix(".items").is_dir():
            raise CurateError(f"{s.label}: its bundle carries no per-item results (submitted before they existed); "
                              "compare the RUN folders instead (`curate compare RUN_A RUN_B`)")
    ia, _ = read_items(a.results_file, key, model_id=a.results[key].get("model_id"))
    ib, _ = read_items(b.results_file, key, model_id=b.results[key].get("model_id"))
    oa, ob = np.argsort(ia["key"], kind="stable"), np.argsort(ib["key"], kind="stable")
    if len(oa) != len(ob) or not np.array_equal(ia["key"][oa], ib["key"][ob]):
        raise CurateError(f"{key}: the two per-item files hold different items; compare needs the same eval set")
    task = task_as_scored(TASKS[key], a.results[key])  # shared_tasks admits a key only when both sides agree
    stat, ca = main_metric_cells(task, ia)
    _, cb = main_metric_cells(task, ib)
    return S.PairedCells.of(stat, np.asarray(cb)[ob], np.asarray(ca)[oa])


def compare_sides(a: Side, b: Side, min_effect: float = MIN_EFFECT, level: float = S.LEVEL,
                  draws: int = S.DRAWS, seed: int = 0,
                  completeness_tolerance: float = COMPLETENESS_TOLERANCE) -> dict:
    """One comparison B - A: rows for each shared task, DataComp group and the average (unadjusted p)."""
    keys, excluded, unknown = shared_tasks(a, b)
    ka, kb = len(a.seeds), len(b.seeds)
    rep = {"a": a.label, "b": b.label, "seeds_a": ka, "seeds_b": kb, "tasks": keys, "not_compared": excluded,
           "fingerprint_unknown": unknown, "level": level, "min_effect": min_effect, "rows": [], "notes": []}
    rep["completeness"] = completeness_check(a, b, completeness_tolerance)
    rep["warnings"] = [rep["completeness"]["warning"]] if rep["completeness"]["warning"] else []
    if rep["completeness"]["note"]:
        rep["notes"].append(rep["completeness"]["note"])
    if not keys:
        rep["notes"].append("no shared task: nothing to compare")
        rep["mode"] = "none"
        return rep
    va, vb = _values(a, keys), _values(b, keys)
    groups = _groups(keys)
    units = [("task", k, [i]) for i, k in enumerate(keys)]
    units += [("group", g, idx) for g, idx in sorted(groups.items())]
    units.append(("average", "average", list(range(len(keys)))))
    seeds_mode = ka + kb >= 3
    rep["mode"] = "seeds" if seeds_mode else "items"
    if seeds_mode:
        rep["method"] = "two-sample t over seeds (pooled seed variance)"
        if min(ka, kb) == 1:
            rep["notes"].append("one side has a single seed: its seed variance is taken from the other side")
    else:
        rep["method"] = "paired percentile bootstrap over items (these two models only)"
        rep["notes"].append("one seed per side: seed variance unknown, so no recipe verdict; the intervals say "
                            "whether these two trained models differ on these items")
    pairs: dict[str, object] = {}
    if not seeds_mode:
        for k in keys:
            try:
                pairs[k] = paired_cells(a.seeds[0], b.seeds[0], k)
            except CurateError as e:
                pairs[k] = str(e)
        lacking = [k for k, p in pairs.items() if isinstance(p, str)]
        if lacking:
            rep["notes"].append(f"no item-level interval for {len(lacking)} task(s): {pairs[lacking[0]]}")
    ss = np.random.SeedSequence(seed).spawn(len(units))
    for (kind, name, idx), sq in zip(units, ss):
        xa, xb = va[:, idx].mean(axis=1), vb[:, idx].mean(axis=1)
        row = {"kind": kind, "name": name, "tasks": len(idx), "mean_a": float(xa.mean()), "mean_b": float(xb.mean()),
               "diff": float(xb.mean() - xa.mean()), "low": None, "high": None, "p": None, "method": None,
               "draws": None, "seeds_needed": None, "seed_sd": None}
        if seeds_mode:
            d = S.seed_difference(xb, xa, level)
            sd = S.pooled_sd(xb, xa)
            row.update(low=d.low, high=d.high, p=d.p_value, method=d.method, seed_sd=sd,
                       seeds_needed=S.seeds_for_power(sd, min_effect, alpha=1 - level))
        else:
            ps = [pairs[keys[i]] for i in idx]
            if all(isinstance(p, S.PairedCells) for p in ps):
                rng = np.random.default_rng(sq)
                d = S.paired_items(ps[0], level, draws, rng) if kind == "task" else S.paired_suite(ps, level, draws, rng)
                row.update(low=d.low, high=d.high, p=d.p_value, method=d.method, draws=d.draws)
        rep["rows"].append(row)
    return rep


def apply_holm(reports: list[dict]) -> None:
    """Holm-adjust the p-values of each family (averages, groups, tasks) over all comparisons; add verdicts."""
    for fam in FAMILIES:
        rows = [r for rep in reports for r in rep["rows"] if r["kind"] == fam]
        adj = S.holm([np.nan if r["p"] is None else r["p"] for r in rows])
        for r, p in zip(rows, adj):
            r["p_holm"] = None if np.isnan(p) else float(p)
    for rep in reports:
        rep["tests"] = {fam: sum(1 for x in reports for r in x["rows"] if r["kind"] == fam and r["p"] is not None)
                        for fam in FAMILIES}
        for r in rep["rows"]:
            r["verdict"] = _verdict(rep, r)
        avg = next((r for r in rep["rows"] if r["kind"] == "average"), None)
        rep["verdict"] = _headline(rep, avg)


def _seeds_text(n, cap=S.SEED_CAP) -> str:
    return f"> {cap}" if n is None else str(n)


def _verdict(rep: dict, r: dict) -> str:
    alpha = 1 - rep["level"]
    if r["p_holm"] is None:
        if rep["mode"] == "items":
            return "seed variance unknown; no item-level data"
        return "no test"
    better = "B better" if r["diff"] > 0 else "A better"
    if rep["mode"] == "items":
        if r["p_holm"] < alpha:
            return f"these models differ ({better.split()[0]} higher); seed variance unknown"
        return "these models indistinguishable on these items; seed variance unknown"
    if r["p_holm"] < alpha:
        return better
    need = r["seeds_needed"] if r["seed_sd"] is not None and np.isfinite(r["seed_sd"]) else None
    return f"no detectable difference; {_seeds_text(need)} seeds/side for 80% power at {rep['min_effect']:.3g}"


def _headline(rep: dict, avg: dict | None) -> str:
    if avg is None:
        return "nothing compared: the two sides share no task"
    where = f"the average over {avg['tasks']} shared task(s)"
    if rep["mode"] == "items":
        base = "seed variance unknown (one seed per side): no recipe verdict"
        if avg["p_holm"] is None:
            return f"{base}; B - A = {avg['diff']:+.4f} on {where}"
        same = "differ" if avg["p_holm"] < 1 - rep["level"] else "do not detectably differ"
        return (f"{base}; these two models {same} on {where}: B - A = {avg['diff']:+.4f} "
                f"[{avg['low']:+.4f}, {avg['high']:+.4f}], p = {avg['p_holm']:.3g}")
    ci = f"B - A = {avg['diff']:+.4f} [{avg['low']:+.4f}, {avg['high']:+.4f}], p = {avg['p_holm']:.3g} (Holm)"
    if avg["p_holm"] < 1 - rep["level"]:
        return f"{'B' if avg['diff'] > 0 else 'A'} is better on {where}: {ci}"
    need = avg["seeds_needed"]
    return (f"no detectable difference on {where}: {ci}; detecting {rep['min_effect']:.3g} with 80% power needs "
            f"{_seeds_text(need)} seeds per side")


def compare(base: Side, others: list[Side], min_effect: float = MIN_EFFECT, level: float = S.LEVEL,
            draws: int = S.DRAWS, seed: int = 0,
            completeness_tolerance: float = COMPLETENESS_TOLERANCE) -> list[dict]:
    """Every other side against `base`, Holm-corrected together."""
    reports = [compare_sides(base, o, min_effect, level, draws, seed, completeness_tolerance) for o in others]
    apply_holm(reports)
    return reports


# ------------------------------------------------------------------------------------------- output

def _f(x, spec=".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def format_report(rep: dict) -> str:
    lines = [f"A = {rep['a']} ({rep['seeds_a']} seed(s))   B = {rep['b']} ({rep['seeds_b']} seed(s))   "
             f"difference = B - A",
             f"method: {rep.get('method', '-')}; {int(rep['level'] * 100)}% intervals; p Holm-corrected over "
             + ", ".join(f"{n} {fam} test(s)" for fam, n in rep.get("tests", {}).items())]
    if rep["not_compared"]:
        lines.append(f"compared only the {len(rep['tasks'])} shared task(s); not compared: "
                     + "; ".join(f"{k} ({why})" for k, why in rep["not_compared"].items()))
    if rep["fingerprint_unknown"]:
        lines.append(f"eval-set fingerprint not recorded for {len(rep['fingerprint_unknown'])} task(s) "
                     "(results older than fingerprints): assumed the same eval set")
    lines += [f"WARNING: {w}" for w in rep.get("warnings", [])]
    lines += [f"note: {n}" for n in rep["notes"]]
    if rep["rows"]:
        w = max([len(r["name"]) + (6 if r["kind"] == "group" else 0) for r in rep["rows"]] + [8])
        head = f"{'task':<{w}} {'A':>8} {'B':>8} {'B - A':>8}  {'95% interval':>19} {'p':>7} {'p Holm':>7}  verdict"
        lines += [head, "-" * len(head)]
        for r in rep["rows"]:
            name = f"group {r['name']}" if r["kind"] == "group" else r["name"]
            ci = f"[{_f(r['low'], '+.4f')}, {_f(r['high'], '+.4f')}]" if r["low"] is not None else "-"
            lines.append(f"{name:<{w}} {_f(r['mean_a']):>8} {_f(r['mean_b']):>8} {_f(r['diff'], '+.4f'):>8}  {ci:>19} "
                         f"{_f(r['p'], '.3g'):>7} {_f(r.get('p_holm'), '.3g'):>7}  {r.get('verdict', '')}")
    lines.append(f"verdict: {rep['verdict']}")
    return "\n".join(lines)


def to_json(reports: list[dict]) -> str:
    def clean(x):
        if isinstance(x, float) and not np.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean({"comparisons": reports}), indent=2, sort_keys=True)
