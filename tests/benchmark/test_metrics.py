"""Metric functions against hand-computed cases and against clip_benchmark's own implementations."""

from __future__ import annotations

import numpy as np
import pytest

from benchmark import metrics as M
from benchmark.tasks import DATACOMP_SCORED, OFFLINE_KEYS, TASKS, get_task, resolve_tasks
from curate.core.errors import CurateError


def test_topk_accuracy_hand_case():
    logits = np.array([[0.1, 0.7, 0.2],   # top1=1, top2={1,2}
                       [0.5, 0.3, 0.2],   # top1=0, top2={0,1}
                       [0.2, 0.3, 0.5]])  # top1=2, top2={2,1}
    target = np.array([2, 0, 0])
    assert M.topk_accuracy(logits, target, 1) == pytest.approx(1 / 3)
    assert M.topk_accuracy(logits, target, 2) == pytest.approx(2 / 3)
    assert M.topk_accuracy(logits, target, 3) == pytest.approx(1.0)


def test_mean_per_class_recall_differs_from_accuracy_on_imbalance():
    target = np.array([0, 0, 0, 0, 1, 1])
    pred = np.array([0, 0, 0, 1, 1, 0])
    # class 0: 3/4, class 1: 1/2 -> mean 0.625; plain accuracy is 4/6
    assert M.mean_per_class_recall(target, pred) == pytest.approx(0.625)
    # a class that is only predicted (never true) does not count
    assert M.mean_per_class_recall([0, 0, 1], [2, 0, 1]) == pytest.approx((0.5 + 1.0) / 2)


def test_classification_metrics_acc5_only_with_five_classes():
    rng = np.random.default_rng(0)
    m4 = M.classification_metrics(rng.normal(size=(20, 4)), rng.integers(0, 4, 20))
    assert m4["acc5"] is None
    logits = np.eye(6)[[0, 1, 2, 3, 4, 5, 0, 0]]
    target = np.array([0, 1, 2, 3, 4, 5, 1, 1])
    m6 = M.classification_metrics(logits, target)
    assert m6["acc1"] == pytest.approx(6 / 8)
    assert m6["acc5"] == pytest.approx(1.0)
    # classes 0,2,3,4,5 recall 1; class 1 recall 1/3
    assert m6["mean_per_class_recall"] == pytest.approx((5 + 1 / 3) / 6)


def test_worst_group_accuracy_and_excluded_group():
    logits = np.eye(3)[[0, 0, 1, 1, 2, 2, 0]]
    target = np.array([0, 1, 1, 1, 2, 0, 2])
    groups = np.array([0, 0, 1, 1, 2, 2, 5])
    # group 0: 1/2, group 1: 2/2, group 2: 1/2, group 5: 0/1
    assert M.worst_group_accuracy(logits, target, groups) == pytest.approx(0.0)
    assert M.worst_group_accuracy(logits, target, groups, exclude=(5,)) == pytest.approx(0.5)
    per = M.group_accuracies(np.array([1, 0, 1, 1]), np.array([3, 3, 7, 7]))
    assert per == {3: (0.5, 2), 7: (1.0, 2)}


def test_worst_group_top5():
    logits = np.tile(np.arange(10, dtype=float), (4, 1))  # top5 = classes 9..5
    target = np.array([9, 5, 4, 0])
    groups = np.array([0, 0, 1, 1])
    assert M.worst_group_accuracy(logits, target, groups, k=5) == pytest.approx(0.0)
    assert M.worst_group_accuracy(logits, target, np.array([0, 1, 0, 1]), k=5) == pytest.approx(0.5)


def test_f1_macro_hand_case():
    target = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 1, 1])
    # class 0: P=1, R=.5 -> F1=2/3 ; class 1: P=2/3, R=1 -> F1=.8
    assert M.f1_macro(target, pred) == pytest.approx((2 / 3 + 0.8) / 2)
    # labels only from target: a class predicted but absent from target is not averaged
    assert M.f1_macro([0, 0], [0, 2]) == pytest.approx(2 / 3)


def test_retrieval_recall_hand_case():
    # 2 images, 4 captions (two per image): text_to_image = [0, 0, 1, 1]
    sim = np.array([[0.9, 0.1],   # caption 0 -> image 0 (correct)
                    [0.2, 0.8],   # caption 1 -> image 1 (wrong)
                    [0.3, 0.7],   # caption 2 -> image 1 (correct)
                    [0.6, 0.4]])  # caption 3 -> image 0 (wrong)
    r = M.retrieval_recall(sim, [0, 0, 1, 1], ks=(1, 2))
    assert r["image_retrieval_recall@1"] == pytest.approx(0.5)
    assert r["image_retrieval_recall@2"] == pytest.approx(1.0)
    # image 0: best caption is 0 (its own) -> hit; image 1: best caption is 1 (image 0's) -> miss
    assert r["text_retrieval_recall@1"] == pytest.approx(0.5)
    assert r["text_retrieval_recall@2"] == pytest.approx(1.0)  # image 1's top2 = captions 1, 2
    assert r["mean_recall@1"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="text_to_image"):
        M.retrieval_recall(sim, [0, 1])


def test_retrieval_recall_matches_clip_benchmark():
    torch = pytest.importorskip("torch")
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    rng = np.random.default_rng(1)
    n_img, per = 40, 3
    t2i = np.repeat(np.arange(n_img), per)
    sim = rng.normal(size=(n_img * per, n_img)).astype(np.float32)
    ours = M.retrieval_recall(sim, t2i, ks=(1, 5, 10))
    scores = torch.from_numpy(sim)
    pos = torch.zeros_like(scores, dtype=torch.bool)
    pos[torch.arange(len(t2i)), torch.from_numpy(t2i)] = True
    for k in (1, 5, 10):
        img = (batchify(recall_at_k, scores, pos, 16, "cpu", k=k) > 0).float().mean().item()
        txt = (batchify(recall_at_k, scores.T, pos.T, 16, "cpu", k=k) > 0).float().mean().item()
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx(img, abs=1e-6)
        assert ours[f"text_retrieval_recall@{k}"] == pytest.approx(txt, abs=1e-6)


def test_topk_accuracy_matches_torch_topk():
    # clip_benchmark 1.6.2's accuracy() fails under numpy 2 (float() of a 1-element array), so its
    # formula is restated here with torch.topk: correct if the target is among the top-k.
    torch = pytest.importorskip("torch")

    rng = np.random.default_rng(2)
    logits = rng.normal(size=(200, 12)).astype(np.float32)
    target = rng.integers(0, 12, 200)
    for k in (1, 5):
        top = torch.from_numpy(logits).topk(k, dim=1).indices
        ref = (top == torch.from_numpy(target)[:, None]).any(dim=1).float().mean().item()
        assert M.topk_accuracy(logits, target, k) == pytest.approx(ref, abs=1e-6)


def test_winogavil_jaccard_hand_case():
    # 5 candidates, 2 true: the top-2 scores hit one of them -> |{a}|/|{a,b,c}| = 1/3
    s5 = [0.9, 0.1, 0.8, 0.2, 0.0]
    y5 = [True, True, False, False, False]
    # 10 candidates, 3 true, all picked -> 1.0
    s10 = list(range(10))
    y10 = [False] * 7 + [True] * 3
    r = M.winogavil_jaccard([s5, s10], [y5, y10])
    assert r["jaccard_score_5"] == pytest.approx(1 / 3)
    assert r["jaccard_score_10-12"] == pytest.approx(1.0)
    assert r["jaccard_score_5-6"] == pytest.approx(1 / 3)
    assert r["avg_jaccard_score"] == pytest.approx((1 / 3 + 1) / 2)
    assert r["jaccard_score_12"] is None  # no such instance: absent, not 0


def test_registry_matches_datacomp():
    assert len(DATACOMP_SCORED) == 38
    assert not TASKS["fairness/fairface"].scored and not TASKS["fairness/utkface"].scored
    mains = {k: TASKS[k].main_metric for k in DATACOMP_SCORED}
    assert mains["vtab/caltech101"] == "mean_per_class_recall"
    assert mains["retrieval/flickr30k"] == "mean_recall@1"
    assert mains["misc/winogavil"] == "jaccard_score_10-12"
    assert mains["wilds/iwildcam"] == "F1-macro_all"
    assert mains["wilds/fmow"] == "acc_worst_region"
    assert mains["fairness/dollar_street"] == "acc_top5_wg"
    assert mains["fairness/geode"] == "acc_wg"
    assert sum(v == "acc1" for v in mains.values()) == 38 - 4 - 2 - 1 - 4
    assert TASKS["vtab/cifar100"].folder == "wds_vtab-cifar100_test"
    assert TASKS["fairness/geode"].folder == "wds_geode_test"
    assert get_task("cifar100").key == "vtab/cifar100"
    with pytest.raises(CurateError, match="unknown task 'nope'"):
        get_task("nope")
    assert [t.key for t in resolve_tasks(["offline"])] == OFFLINE_KEYS
    assert len(resolve_tasks(None)) == 40 + len(OFFLINE_KEYS)


def _fake_results(rng, keys):
    return {k: {"key": k, "main_metric": TASKS[k].main_metric,
                "metrics": {TASKS[k].main_metric: float(rng.uniform()), "acc1": 0.123}} for k in keys}


def test_aggregate_is_datacomps_formula_on_38_fake_results():
    rng = np.random.default_rng(3)
    results = _fake_results(rng, [t.key for t in TASKS.values() if t.suite == "datacomp" and t.scored])
    agg = M.datacomp_average(results, DATACOMP_SCORED)
    # DataComp: the unweighted mean over the 38 tasks of each task's main metric
    expected = sum(r["metrics"][r["main_metric"]] for r in results.values()) / 38
    assert agg["average"] == pytest.approx(expected)
    assert agg["n_tasks"] == 38 and agg["complete"] and agg["missing"] == []


def test_aggregate_with_missing_tasks_is_partial_not_zero():
    rng = np.random.default_rng(4)
    results = _fake_results(rng, DATACOMP_SCORED[:30])
    agg = M.datacomp_average(results, DATACOMP_SCORED)
    assert agg["n_tasks"] == 30 and not agg["complete"]
    assert agg["missing"] == DATACOMP_SCORED[30:]
    # mean over the 30 present ones; counting the 8 missing as 0 would give a lower number
    present = [results[k]["metrics"][results[k]["main_metric"]] for k in DATACOMP_SCORED[:30]]
    assert agg["average"] == pytest.approx(np.mean(present))
    assert M.datacomp_average({}, DATACOMP_SCORED)["average"] is None


def test_mean_reciprocal_rank_hand_case_and_its_chance_level():
    """MRR (suite v2's main metric): ranks 0, 1, 3 give (1 + 1/2 + 1/4) / 3; a query with no answer (-1) counts
    0; a random scorer's expected MRR over n candidates is H_n / n, checked against a simulation."""
    assert M.mean_reciprocal_rank([0, 1, 3]) == pytest.approx((1 + 0.5 + 0.25) / 3)
    assert M.mean_reciprocal_rank([0, -1]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        M.mean_reciprocal_rank([])
    assert M.chance_mrr(1) == 1.0 and M.chance_mrr(4) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40_000, 50))
    target = rng.integers(0, 50, 40_000)
    sim = M.mean_reciprocal_rank(M.true_class_rank(logits, target))
    assert sim == pytest.approx(M.chance_mrr(50), rel=0.03)
    with pytest.raises(ValueError):
        M.chance_mrr(0)


def test_retrieval_mrr_from_ranks_both_ways():
    r = M.retrieval_mrr_from_ranks([0, 1, 0, 3], [1, -1])
    assert r["image_retrieval_mrr"] == pytest.approx((1 + 0.5 + 1 + 0.25) / 4)
    assert r["text_retrieval_mrr"] == pytest.approx(0.25)
    assert r["mean_mrr"] == pytest.approx(0.5 * (r["image_retrieval_mrr"] + r["text_retrieval_mrr"]))


def test_suite_v2_tasks_are_scored_by_mrr_with_a_chance_level_from_the_built_set():
    from benchmark.evalsets import chance_levels
    from benchmark.leaderboard import chance_level
    from benchmark.tasks import SUITE_V2_HEADLINE

    assert {TASKS[k].main_metric for k in SUITE_V2_HEADLINE} == {"mrr", "mean_mrr"}
    cls, ret = TASKS["offline_v2/emoji_heldout"], TASKS["offline_v2/tuxpaint_heldout"]
    assert chance_levels(cls, [0, 1, 2, 2], 3)["main"] == pytest.approx(M.chance_mrr(3))
    assert chance_levels(ret, list(range(7)), 7)["main"] == pytest.approx(M.chance_mrr(7))
    # from per-item metadata, as the leaderboard reads it
    assert chance_level(cls.key, {"n_classes": 418}) == pytest.approx(M.chance_mrr(418))
    assert chance_level(ret.key, {"n": 189}) == pytest.approx(M.chance_mrr(189))
