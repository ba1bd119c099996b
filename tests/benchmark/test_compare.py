"""`curate compare A B`: paired differences per task, group and average with 95% intervals, Holm-corrected
p-values and verdicts; one seed per side says seed variance is unknown; only shared tasks and eval sets are
compared; `curate leaderboard --compare` is an alias. Calibrated: under the null it declares a difference in
~5% of comparisons, and with a planted difference it detects it at the power it predicts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from benchmark import compare as C
from benchmark import stats as S
from benchmark.evaluate import items_path, metrics_from_items, write_items
from benchmark.submit import SubmitConfig, submit
from benchmark.tasks import TASKS
from curate.cli import main
from curate.core import atomic
from curate.core.errors import CurateError
from tests.run_factory import make_run, make_subset

RET = "retrieval/mscoco_2014_5k_test_image_text_retrieval"
KEYS = ["cifar10", "vtab/caltech101", "vtab/cifar100", RET]


def _items(key: str, acc: float, rng, truth) -> tuple[dict, dict]:
    """Synthetic per-item results of a model with accuracy ~acc on the fixed items `truth[key]`."""
    t = truth[key]
    n = len(t["key"])
    right = rng.random(n) < acc
    if key == RET:
        ranks = np.where(rng.random(3 * n) < acc, 0, rng.integers(1, 20, 3 * n))
        return ({"key": t["key"], "n_captions": np.full(n, 3), "text_rank": np.where(right, 0, 3),
                 "caption_ranks": (ranks, np.full(n, 3))}, {})
    pred = np.where(right, t["target"], (t["target"] + 1) % 10)
    rank = np.where(right, 0, 1 + rng.integers(0, 8, n))
    return {"key": t["key"], "target": t["target"], "pred": pred, "rank": rank}, {"n_classes": 10}


def fake_run(dir: Path, seed: int, acc: dict[str, float], truth, recipe: str = "r1", fingerprints=None) -> Path:
    """A RUN folder as `curate evaluate` leaves it: results lines + per-item files, info.json with seed/recipe."""
    rng = np.random.default_rng([int(hashlib.sha256(dir.name.encode()).hexdigest()[:8], 16), seed])
    dir.mkdir(parents=True)
    out = dir / "eval_results.jsonl"
    mid = f"curate-debug__{hashlib.sha256(str(dir).encode()).hexdigest()[:12]}"
    lines = []
    for key, a in acc.items():
        items, extra = _items(key, a, rng, truth)
        fp = (fingerprints or {}).get(key, f"fp-{key}")
        meta = {"model_id": mid, "task": key, "main_metric": TASKS[key].main_metric, "kind": TASKS[key].type,
                "evalset_fingerprint": fp, "n": len(items["key"]), **extra}
        write_items(items_path(out, key), items, meta)
        back = {k: (v[0] if k == "caption_ranks" else v) for k, v in items.items()}
        lines.append({"key": key, "dataset": TASKS[key].name, "main_metric": TASKS[key].main_metric,
                      "metrics": metrics_from_items(TASKS[key], back, meta), "n": len(items["key"]),
                      "model_id": mid, "evalset_fingerprint": fp})
    atomic.write_text(out, "".join(json.dumps(r) + "\n" for r in lines))
    atomic.write_json(dir / "info.json", {"seed": seed, "subset_hash": recipe, "model": "curate-debug"})
    return dir


@pytest.fixture(scope="module")
def truth():
    rng = np.random.default_rng(0)
    return {k: {"key": np.array([f"{i:05d}" for i in range(600)]), "target": rng.integers(0, 10, 600)} for k in KEYS}


def test_one_seed_per_side_item_level_no_recipe_verdict(tmp_path, truth):
    a = fake_run(tmp_path / "a", 0, {k: 0.40 for k in KEYS}, truth)
    b = fake_run(tmp_path / "b", 0, {k: 0.55 for k in KEYS}, truth, recipe="r2")
    r = CliRunner().invoke(main, ["compare", str(a), str(b)])
    assert r.exit_code == 0, r.output
    assert "seed variance unknown (one seed per side): no recipe verdict" in r.output
    assert "these two models differ on the average over 4 shared task(s)" in r.output
    rows = [l for l in r.output.splitlines() if l.startswith(("cifar10", "group vtab", "average"))]
    assert len(rows) == 3 and all("[+" in l for l in rows)  # intervals, all above 0 for a planted +0.15
    r = CliRunner().invoke(main, ["compare", str(a), str(b), "--json"])
    rep = json.loads(r.output)["comparisons"][0]
    assert rep["mode"] == "items" and rep["seeds_a"] == rep["seeds_b"] == 1
    by = {(x["kind"], x["name"]): x for x in rep["rows"]}
    assert set(by) == {("task", k) for k in KEYS} | {("group", "vtab"), ("group", "retrieval"), ("average", "average")}
    for x in rep["rows"]:
        assert x["low"] < x["diff"] < x["high"] and x["p_holm"] >= x["p"] and x["draws"] == S.DRAWS
        assert x["diff"] == pytest.approx(x["mean_b"] - x["mean_a"])
    avg = by[("average", "average")]
    assert avg["diff"] == pytest.approx(np.mean([by[("task", k)]["diff"] for k in KEYS]))
    # the same model on both sides: indistinguishable, p = 1
    r = CliRunner().invoke(main, ["compare", str(a), str(a), "--json"])
    same = json.loads(r.output)["comparisons"][0]
    assert all(x["diff"] == 0 and x["p"] == 1.0 for x in same["rows"])
    assert "do not detectably differ" in same["verdict"]


def test_only_shared_tasks_and_eval_sets_are_compared(tmp_path, truth):
    a = fake_run(tmp_path / "a", 0, {k: 0.5 for k in KEYS}, truth)
    b = fake_run(tmp_path / "b", 0, {k: 0.5 for k in KEYS[:3]}, truth, fingerprints={"vtab/cifar100": "other"})
    r = CliRunner().invoke(main, ["compare", str(a), str(b)])
    assert r.exit_code == 0, r.output
    assert "compared only the 2 shared task(s); not compared:" in r.output
    assert f"{RET} (only in A)" in r.output
    assert "vtab/cifar100 (different eval sets (fingerprints fp-vtab/cifar100, other))" in r.output
    assert "the average over 2 shared task(s)" in r.output


def test_seeds_give_recipe_verdicts_with_holm_over_comparisons(tmp_path, truth):
    acc_a, acc_b = {k: 0.40 for k in KEYS}, {k: 0.60 for k in KEYS}
    a = ",".join(str(fake_run(tmp_path / f"a{s}", s, acc_a, truth)) for s in range(3))
    b = ",".join(str(fake_run(tmp_path / f"b{s}", s, acc_b, truth, recipe="r2")) for s in range(3))
    c = ",".join(str(fake_run(tmp_path / f"c{s}", s, acc_a, truth, recipe="r3")) for s in range(3))
    r = CliRunner().invoke(main, ["compare", a, b, c, "--json", "--min-effect", "0.01"])
    assert r.exit_code == 0, r.output
    reps = json.loads(r.output)["comparisons"]
    assert [x["mode"] for x in reps] == ["seeds", "seeds"] and reps[0]["seeds_a"] == 3
    assert reps[0]["tests"] == {"average": 2, "group": 4, "task": 8}  # Holm families span both comparisons
    avg_b = next(x for x in reps[0]["rows"] if x["kind"] == "average")
    assert avg_b["verdict"] == "B better" and avg_b["low"] > 0 and reps[0]["verdict"].startswith("B is better")
    avg_c = next(x for x in reps[1]["rows"] if x["kind"] == "average")
    assert avg_c["p_holm"] >= avg_c["p"] and "no detectable difference" in avg_c["verdict"]  # C is A's accuracy
    ps = [x["p"] for rep in reps for x in rep["rows"] if x["kind"] == "task"]
    adj = [x["p_holm"] for rep in reps for x in rep["rows"] if x["kind"] == "task"]
    assert adj == pytest.approx(list(S.holm(ps)))
    sd = avg_b["seed_sd"]
    assert sd > 0 and avg_b["seeds_needed"] == S.seeds_for_power(sd, 0.01)
    # text output: per-task rows, groups, the average and the headline
    r = CliRunner().invoke(main, ["compare", a, b])
    assert "two-sample t over seeds (pooled seed variance)" in r.output and "group vtab" in r.output


def test_sides_must_be_one_recipe(tmp_path, truth):
    a0 = fake_run(tmp_path / "a0", 0, {"cifar10": 0.5}, truth)
    a1 = fake_run(tmp_path / "a1", 1, {"cifar10": 0.5}, truth, recipe="other")
    with pytest.raises(CurateError, match="trained on different subsets"):
        C.load_paths(f"{a0},{a1}")
    a2 = fake_run(tmp_path / "a2", 0, {"cifar10": 0.5}, truth)
    with pytest.raises(CurateError, match="same seed appears twice"):
        C.load_paths(f"{a0},{a2}")
    r = CliRunner().invoke(main, ["compare", str(a0), "nonesuch", "--db", str(tmp_path / "none.duckdb")])
    assert r.exit_code == 2 and "no leaderboard yet" in r.output


def test_old_results_without_items_say_how_to_get_them(tmp_path, truth):
    import shutil

    a = fake_run(tmp_path / "a", 0, {"cifar10": 0.5}, truth)
    b = fake_run(tmp_path / "b", 0, {"cifar10": 0.6}, truth)
    shutil.rmtree(b / "eval_results.items")
    r = CliRunner().invoke(main, ["compare", str(a), str(b)])
    assert r.exit_code == 0, r.output
    assert "no item-level interval for 1 task(s)" in r.output
    assert f"curate evaluate --run {b} --tasks cifar10 --force" in r.output


def test_leaderboard_compare_is_an_alias(tmp_path):
    db = tmp_path / "lb.duckdb"
    uids = [f"{i:032x}" for i in range(1, 40)]
    for name, scores in {"no_filter": [0.20, 0.24, 0.22], "clip": [0.30, 0.34, 0.29]}.items():
        subset = make_subset(tmp_path / f"s_{name}", uids[:10], name=name)
        for seed, v in enumerate(scores):
            submit(SubmitConfig(run=make_run(tmp_path / f"r_{name}{seed}", subset, seed=seed,
                                             scores={"cifar10": v, "mnist": v / 2}),
                                leaderboard_db=db, tarball=False))
    r1 = CliRunner().invoke(main, ["compare", "--db", str(db), "no_filter", "clip"])
    r2 = CliRunner().invoke(main, ["leaderboard", "--db", str(db), "--compare", "no_filter", "clip"])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    assert r1.output == r2.output
    assert "A = no_filter (3 seed(s))" in r1.output and "verdict: B is better" in r1.output


# ------------------------------------------------------------------------------------------- calibration

def _side(label: str, values: np.ndarray) -> C.Side:
    """A side of len(values) seeds scored on two tasks (values: (seeds, 2))."""
    return C.Side(label, [C.Seed(f"{label}{i}", {k: {"key": k, "main_metric": "acc1", "metrics": {"acc1": float(v)}}
                                               for k, v in zip(("cifar10", "mnist"), row)}, i)
                          for i, row in enumerate(values)])


def _declared(reports) -> bool:
    return reports[0]["verdict"].startswith(("A is better", "B is better"))


def test_null_same_recipe_declares_a_difference_in_about_5_percent():
    """Same recipe, different seeds, 3 seeds each: the average's verdict declares a difference in ~5% of
    2,000 simulated comparisons (Monte-Carlo se 0.5%)."""
    rng = np.random.default_rng(1)
    hits = sum(_declared(C.compare(_side("a", rng.normal(0.3, 0.006, (3, 2))),
                                   [_side("b", rng.normal(0.3, 0.006, (3, 2)))])) for _ in range(2000))
    assert 0.035 <= hits / 2000 <= 0.065, hits / 2000


def test_planted_difference_detected_at_predicted_power():
    """A planted difference on the average is declared at the power stats.power_two_sample predicts for the
    seeds per side that compare says are needed (2,000 comparisons; se ~1%)."""
    rng = np.random.default_rng(2)
    sd_task, effect = 0.006, 0.006
    sd_avg = sd_task / np.sqrt(2)  # the average of two independent tasks
    k = S.seeds_for_power(sd_avg, effect)
    predicted = S.power_two_sample(k, sd_avg, effect)
    assert 0.8 <= predicted < 0.95 and k >= 3
    hits = sum(_declared(C.compare(_side("a", rng.normal(0.3, sd_task, (k, 2))),
                                   [_side("b", rng.normal(0.3 + effect, sd_task, (k, 2)))])) for _ in range(2000))
    assert hits / 2000 == pytest.approx(predicted, abs=0.035)
