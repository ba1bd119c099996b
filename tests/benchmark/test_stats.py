"""benchmark.stats is calibrated: intervals cover at their level (items: n in {100, 1000}, p in {0.02, 0.1, 0.5};
seeds: 3 and 5), the seed test holds its size under the null and has the power it predicts, item bootstraps
agree with scipy.stats.bootstrap, and the cell shortcut is the exact item resampling. Seeded and vectorised."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import balanced_accuracy_score

from benchmark import metrics as M
from benchmark import stats as S

GRID = [(n, p) for n in (100, 1000) for p in (0.02, 0.1, 0.5)]


def _binary_cells(k: int, n: int) -> S.TaskCells:
    return S.TaskCells(S.Proportion(), np.array([[0.0], [1.0]]), np.array([n - k, k]))


# ------------------------------------------------------------------------------------------- resampling

def test_multinomial_is_exact_multinomial():
    """Binary splitting draws the multinomial: every draw sums to n, and means/covariances match n p."""
    counts = np.array([5, 0, 3, 40, 1, 7, 2])
    n, p = counts.sum(), counts / counts.sum()
    d = S.multinomial(counts, 200_000, np.random.default_rng(0))
    assert (d.sum(axis=1) == n).all() and (d[:, 1] == 0).all()
    cov = n * (np.diag(p) - np.outer(p, p))
    se_mean = np.sqrt(np.diag(cov) / len(d))
    assert np.all(np.abs(d.mean(axis=0) - n * p) <= 5 * se_mean + 1e-12)
    assert np.allclose(np.cov(d.T), cov, atol=0.03 * n * p.max())
    # same distribution as numpy's own multinomial (two-sample KS on one cell's counts)
    ref = np.random.default_rng(1).multinomial(n, p, size=20_000)
    assert sps.ks_2samp(d[:20_000, 3], ref[:, 3]).pvalue > 0.001


def _metric_items(rng, n=600):
    """Raw per-item data for each statistic type and the evaluator's own metric on it."""
    y = rng.integers(0, 6, n)
    pred = np.where(rng.random(n) < 0.55, y, rng.integers(0, 8, n))
    group = rng.integers(0, 5, n)
    ncap = rng.integers(1, 4, n)
    cap_ranks = [rng.geometric(0.4, c) - 1 for c in ncap]
    text_rank = rng.geometric(0.5, n) - 1
    sizes = rng.choice([5, 6, 10, 12], n)
    assoc = rng.integers(1, 4, n)
    hits = rng.binomial(assoc, 0.5)
    jac = np.where(assoc > 0, hits / (2 * assoc - hits), 0.0)
    cases = {
        "accuracy": (S.Proportion(), (pred == y)[:, None].astype(float),
                     lambda i: float((pred[i] == y[i]).mean())),
        "mean_per_class_recall": (S.MeanPerClassRecall(), np.c_[y, pred == y],
                                  lambda i: M.mean_per_class_recall(y[i], pred[i])),
        "worst_group": (S.WorstGroup((4,)), np.c_[group, pred == y],
                        lambda i: min(a for a, _ in M.group_accuracies(pred[i] == y[i], group[i], (4,)).values())),
        "f1_macro": (S.F1Macro(), np.c_[y, pred],
                     lambda i: M.f1_macro(y[i], pred[i])),
        "retrieval": (S.RetrievalRecall("mean"),
                      np.c_[ncap, [int((r < 1).sum()) for r in cap_ranks], text_rank < 1],
                      lambda i: M.retrieval_recall_from_ranks(np.concatenate([cap_ranks[j] for j in i]),
                                                              text_rank[i], ks=(1,))["mean_recall@1"]),
        "winogavil": (S.SubsetMean(), np.c_[sizes >= 10, jac],
                      lambda i: M.winogavil_summary(jac[i], sizes[i])["jaccard_score_10-12"]),
    }
    return cases


@pytest.mark.parametrize("kind", ["accuracy", "mean_per_class_recall", "worst_group", "f1_macro", "retrieval",
                                  "winogavil"])
def test_cells_give_the_metric_and_scipy_bootstrap(kind):
    """Per statistic type: the cell estimate is the evaluator's metric, and the cell bootstrap (percentile)
    agrees with scipy.stats.bootstrap resampling the raw items (percentile, independent resamples) within
    Monte-Carlo error (both distributions' quantiles, mean and sd)."""
    rng = np.random.default_rng(7)
    stat, cols, metric = _metric_items(rng)[kind]
    n = len(cols)
    task = S.TaskCells.of(stat, cols)
    assert task.estimate == pytest.approx(metric(np.arange(n)), abs=1e-12)
    b = 2000
    ours = task.draws(b, np.random.default_rng(1))
    ref = sps.bootstrap((np.arange(n),), lambda i: metric(i.astype(int)), n_resamples=b, method="percentile",
                        vectorized=False, random_state=np.random.default_rng(2))
    sd = ref.standard_error
    lo, hi = S.task_interval(task, draws=b, seed=1, method="percentile").low, \
        S.task_interval(task, draws=b, seed=1, method="percentile").high
    # MC standard error of a 2.5% quantile from 2000 draws is ~0.055 sd per side (0.08 for the difference
    # of two): 4 of those; the means' difference has se 0.032 sd, the sd's relative se is ~2%
    assert abs(lo - ref.confidence_interval.low) < 0.32 * sd
    assert abs(hi - ref.confidence_interval.high) < 0.32 * sd
    assert abs(ours.mean() - ref.bootstrap_distribution.mean()) < 0.13 * sd
    assert ours.std() == pytest.approx(sd, rel=0.09)


def test_paired_bootstrap_matches_scipy_paired():
    """Paired item difference: joint cells of two models = scipy's paired resampling of items."""
    rng = np.random.default_rng(3)
    n = 500
    y = rng.integers(0, 5, n)
    pa = np.where(rng.random(n) < 0.5, y, rng.integers(0, 5, n))
    pb = np.where(rng.random(n) < 0.6, y, pa)  # correlated with model a
    stat = S.MeanPerClassRecall()
    pair = S.PairedCells.of(stat, np.c_[y, pb == y], np.c_[y, pa == y])
    d = S.paired_items(pair, draws=2000, seed=0)
    assert d.estimate == pytest.approx(balanced_accuracy_score(y, pb) - balanced_accuracy_score(y, pa), abs=1e-12)
    ref = sps.bootstrap((np.arange(n),), lambda i: M.mean_per_class_recall(y[i], pb[i]) - M.mean_per_class_recall(y[i], pa[i]),
                        n_resamples=2000, method="percentile", vectorized=False, random_state=np.random.default_rng(4))
    sd = ref.standard_error
    assert abs(d.low - ref.confidence_interval.low) < 0.32 * sd
    assert abs(d.high - ref.confidence_interval.high) < 0.32 * sd
    same = S.paired_items(S.PairedCells.of(stat, np.c_[y, pa == y], np.c_[y, pa == y]), draws=500)
    assert same.estimate == 0 and same.low == same.high == 0 and same.p_value == 1.0


# ------------------------------------------------------------------------------------------- coverage: items

@pytest.mark.parametrize("n,p", GRID)
def test_task_interval_coverage_grid(n, p):
    """A task's accuracy interval covers the true accuracy 93-97% of the time over the grid (20,000 eval
    sets per point; Monte-Carlo se 0.15%)."""
    rng = np.random.default_rng(int(n * 1000 + p * 100))
    k = rng.binomial(n, p, size=20_000)
    lo, hi = S.wilson(k, n)
    cover = np.mean((lo <= p) & (p <= hi))
    assert 0.93 <= cover <= 0.97, cover
    # the interval task_interval reports is this one
    iv = S.task_interval(_binary_cells(int(k[0]), n))
    assert (iv.low, iv.high) == pytest.approx((lo[0], hi[0])) and iv.method == "wilson score" and iv.n == n


def test_percentile_bootstrap_of_a_rare_proportion_undercovers():
    """Why proportions get Wilson: at n=100, p=0.02 the percentile bootstrap covers < 90% (exactly computed)."""
    n, p = 100, 0.02
    x = np.arange(n + 1)
    lo = sps.binom.ppf(0.025, n, x / n) / n
    hi = sps.binom.ppf(0.975, n, x / n) / n
    assert sps.binom.pmf(x, n, p)[(lo <= p) & (p <= hi)].sum() < 0.90


def test_suite_interval_covers():
    """The suite average (tasks resampled independently) covers 93-97% (2,000 simulated suites of 6 tasks,
    1,000 draws; Monte-Carlo se 0.5%)."""
    rng = np.random.default_rng(11)
    suite = [(500, 0.02), (500, 0.5), (1000, 0.1), (2000, 0.3), (1000, 0.7), (700, 0.05)]
    truth = np.mean([p for _, p in suite])
    hits = 0
    for r in range(2000):
        tasks = [_binary_cells(int(rng.binomial(n, p)), n) for n, p in suite]
        iv = S.suite_interval(tasks, draws=1000, seed=r)
        hits += iv.low <= truth <= iv.high
    assert 0.93 <= hits / 2000 <= 0.97, hits / 2000


def test_bootstrap_interval_of_mean_per_class_recall_covers():
    """A mean-per-class-recall task (10 classes of unequal size and recall, 1,000 items) covers 93-97%
    (1,200 simulated eval sets, 1,000 draws; Monte-Carlo se 0.6%)."""
    rng = np.random.default_rng(12)
    shares = np.linspace(1, 3, 10) / np.linspace(1, 3, 10).sum()
    recall = np.linspace(0.2, 0.9, 10)
    probs = np.ravel(np.c_[shares * (1 - recall), shares * recall])  # cells (class c, wrong), (class c, right)
    x = np.array([[c, ok] for c in range(10) for ok in (0, 1)], dtype=float)
    hits = 0
    for r in range(1200):
        t = S.TaskCells(S.MeanPerClassRecall(), x, rng.multinomial(1000, probs))
        iv = S.task_interval(t, draws=1000, seed=r)
        hits += iv.low <= recall.mean() <= iv.high
    assert 0.93 <= hits / 1200 <= 0.97, hits / 1200


# ------------------------------------------------------------------------------------------- seeds

@pytest.mark.parametrize("k", [3, 5])
def test_seed_interval_covers_at_3_and_5_seeds(k):
    """Per-seed scores = recipe mean + seed noise + item noise: the t interval covers 93-97%."""
    rng = np.random.default_rng(k)
    mu, sd_seed, n = 0.3, 0.01, 2000
    p_seed = mu + rng.normal(0, sd_seed, size=(20_000, k))
    scores = rng.binomial(n, p_seed) / n
    _, lo, hi = S.t_interval(scores)
    cover = np.mean((lo <= mu) & (mu <= hi))
    assert 0.93 <= cover <= 0.97, cover
    iv = S.seed_interval(scores[0])
    assert (iv.low, iv.high) == pytest.approx((lo[0], hi[0])) and iv.n == k and iv.method == "t over seeds"
    assert np.isnan(S.seed_interval([0.3]).low)  # one seed: seed variance unknown


def test_seed_test_size_under_the_null_and_predicted_power():
    """3 seeds a side, same recipe: a difference is declared in ~5%; with a planted difference the test
    detects it at the power power_two_sample predicts (40,000 simulated comparisons; se ~0.25%)."""
    rng = np.random.default_rng(5)
    sd, r = 0.006, 40_000
    for k in (3, 5):
        x, y = rng.normal(0.3, sd, (r, k)), rng.normal(0.3, sd, (r, k))
        assert 0.04 <= np.mean(S.pooled_t(x, y)[3] < 0.05) <= 0.06
        for effect in (0.006, 0.012):
            y = rng.normal(0.3 + effect, sd, (r, k))
            got = np.mean(S.pooled_t(y, x)[3] < 0.05)
            assert got == pytest.approx(S.power_two_sample(k, sd, effect), abs=0.012), (k, effect)


def test_seeds_for_power_capped():
    k = S.seeds_for_power(0.006, 0.006)
    assert k is not None and S.power_two_sample(k, 0.006, 0.006) >= 0.8 > S.power_two_sample(k - 1, 0.006, 0.006)
    assert S.seeds_for_power(0.006, 0.0005) is None  # far more than the cap: shown as "> 50"
    assert S.seeds_for_power(0.006, 0.0005, cap=5000) > 50
    assert S.seeds_for_power(float("nan"), 0.01) is None and S.seeds_for_power(0.0, 0.01) == 2


def test_seed_difference_one_seed_on_one_side():
    d = S.seed_difference([0.31, 0.30, 0.32], [0.25])
    assert d.estimate == pytest.approx(0.06) and d.low < d.estimate < d.high and 0 < d.p_value < 1
    assert np.isnan(S.seed_difference([0.3], [0.2]).p_value)  # 1 + 1 seeds: nothing to test with


# ------------------------------------------------------------------------------------------- Holm

def test_holm_adjusts_and_controls_familywise_error():
    assert S.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = S.holm([0.2, np.nan, 0.01])
    assert np.isnan(out[1]) and out[0] == pytest.approx(0.2) and out[2] == pytest.approx(0.02)
    p = np.random.default_rng(0).random((20_000, 10))  # 10 true nulls per family
    adj = np.apply_along_axis(S.holm, 1, p)
    fwer = np.mean((adj < 0.05).any(axis=1))
    assert 0.035 <= fwer <= 0.05 + 0.004
    assert np.mean((p < 0.05).any(axis=1)) > 0.35  # uncorrected would declare something 40% of the time


def test_intervals_of_a_whole_result():
    """`intervals` (one bootstrap per task for both the task's and the average's interval) reports Wilson for
    proportions, the percentile bootstrap for the rest, and the unweighted mean over tasks."""
    rng = np.random.default_rng(4)
    cases = _metric_items(rng)
    tasks = {k: S.TaskCells.of(stat, cols) for k, (stat, cols, _) in cases.items()}
    res = S.intervals(tasks, draws=2000, seed=0)
    assert res["tasks"]["accuracy"] == S.task_interval(tasks["accuracy"])
    for k, iv in res["tasks"].items():
        assert iv.low <= iv.estimate <= iv.high and iv.level == 0.95
        assert iv.method == ("wilson score" if k == "accuracy" else "percentile bootstrap over items (multinomial cells)")
    avg = res["average"]
    assert avg.estimate == pytest.approx(np.mean([t.estimate for t in tasks.values()]))
    assert avg.draws == 2000 and avg.n == sum(t.n for t in tasks.values())
    # the average's interval is narrower than the mean of the task intervals' widths (independent tasks)
    assert avg.high - avg.low < np.mean([iv.high - iv.low for iv in res["tasks"].values()])
    assert S.intervals(tasks, draws=2000, seed=0)["average"] == avg  # seeded
