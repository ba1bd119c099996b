"""Honest verdicts: intervals over items and over seeds, paired differences, Holm correction, seeds for power.

Pure numpy/scipy, vectorised and seeded (the same call gives the same numbers). Two kinds of uncertainty
are kept apart, because they answer different questions:

* **Items** - a task's eval set is a sample of items; one trained model's score would move on another
  sample. `task_interval` / `suite_interval` bootstrap over items (the suite average resamples each task
  independently) and `paired_items` / `paired_suite` give the item-level difference of two models scored
  on the same items (resampled jointly, so what they share cancels). This says how sure we are about
  *these two trained models*, not about the recipes that produced them.
* **Seeds** - training is random; a recipe's score varies with the seed. `seed_interval` (t-based on
  per-seed scores) and `seed_difference` (two-sample t with a pooled seed variance) are valid with 3 seeds,
  where a percentile bootstrap over 3 seeds covers about 70% and a permutation test over 3+3 seeds can
  never reach p < 0.05. `power_two_sample` / `seeds_for_power` are the exact power of that same test
  (noncentral t), so the predicted power is the power the test has.

How the item bootstrap stays cheap: every metric `curate evaluate` reports depends on the items only
through a small table of distinct *cells* (accuracy: right/wrong; mean per-class recall and worst-group:
(class or group, right/wrong); F1-macro: (true, predicted) pairs; retrieval: per image (captions, caption
hits, image hit); WinoGAViL: (in the 10-12 subset, Jaccard)). Resampling n items with replacement is the
same as drawing the cell counts from Multinomial(n, observed cell shares), which `multinomial` does
exactly, vectorised over draws, by binary splitting (a binomial per tree node). The statistic is then a
few sparse matrix products of the draws, so 727k items x 10,000 draws take seconds, not hours.

A single proportion (accuracy) gets the Wilson score interval rather than the percentile bootstrap: at
n=100 items and p=0.02 the percentile bootstrap collapses to [0, 0] whenever no item is right and covers
only about 87%, while Wilson's coverage stays within 93.6-95% over the tested grid (tests/benchmark/
test_stats.py). `method="percentile"` forces the bootstrap for every statistic (it is what
`scipy.stats.bootstrap(method="percentile")` computes, and the tests check they agree).

Every result records its `method`, `draws` and `level`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import sparse
from scipy import stats as sps

LEVEL = 0.95
DRAWS = 10_000
POWER = 0.80
SEED_CAP = 50  # seeds_for_power answers "> SEED_CAP" beyond this
_BLOCK = 1 << 22  # draws x cells per block: bounds the memory of one bootstrap block (~32 MB)


# ------------------------------------------------------------------------------------------- resampling

def multinomial(counts, draws: int, rng: np.random.Generator) -> np.ndarray:
    """(draws, K) cell counts of `counts.sum()` items resampled with replacement (exact multinomial).

    Binary splitting: the count of a node's left half is Binomial(node count, left share), each node
    vectorised over all draws, so the cost is one binomial per draw and cell with log2(K) Python levels
    of recursion (numpy's own `multinomial` loops per draw and is ~50x slower for hundreds of cells).
    """
    counts = np.asarray(counts, dtype=np.int64)
    k = len(counts)
    out = np.empty((draws, k), dtype=np.int64)
    csum = np.concatenate([[0], np.cumsum(counts)])

    def split(lo: int, hi: int, tot: np.ndarray) -> None:
        if hi - lo == 1:
            out[:, lo] = tot
            return
        mid = (lo + hi) // 2
        node = csum[hi] - csum[lo]
        left = rng.binomial(tot, min(1.0, (csum[mid] - csum[lo]) / node)) if node else np.zeros_like(tot)
        split(lo, mid, left)
        split(mid, hi, tot - left)

    split(0, k, np.full(draws, csum[-1], dtype=np.int64))
    return out


def cells(columns) -> tuple[np.ndarray, np.ndarray]:
    """Distinct item rows and their counts: (X (K, F), counts (K,)) from per-item columns (n, F)."""
    cols = np.asarray(columns, dtype=np.float64)
    if cols.ndim == 1:
        cols = cols[:, None]
    if len(cols) == 0:
        raise ValueError("no items")
    x, counts = np.unique(cols, axis=0, return_counts=True)
    return x, counts.astype(np.int64)


# ------------------------------------------------------------------------------------------- statistics

def _indicator(labels: np.ndarray, values: np.ndarray | None = None) -> tuple[sparse.csr_matrix, np.ndarray]:
    """(C x K) sparse matrix with `values` (default 1) at (class of cell k, k), and the class labels."""
    uniq, inv = np.unique(labels, return_inverse=True)
    k = len(labels)
    data = np.ones(k) if values is None else np.asarray(values, dtype=np.float64)
    return sparse.csr_matrix((data, (inv, np.arange(k))), shape=(len(uniq), k)), uniq


def _per_class(m: sparse.csr_matrix, w: np.ndarray) -> np.ndarray:
    """(B, C) sums of cell weights per class: (m @ w.T).T without densifying m."""
    return np.asarray(m @ w.T.astype(np.float64)).T


class Statistic:
    """A metric as a function of cell weights: `stat(X, W)` -> (B,) values, X = cells (K, F), W = (B, K).

    `columns` names what each per-item column means; subclasses are the metric types the evaluator has.
    """

    name = "statistic"
    columns: tuple[str, ...] = ()
    proportion = False  # a plain mean of 0/1 outcomes: Wilson interval by default

    def __call__(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Mean(Statistic):
    """Mean of a per-item value (the reciprocal rank of MRR). Columns: (value,)."""

    name, columns = "mean", ("value",)

    def __call__(self, x, w):
        w = np.asarray(w, dtype=np.float64)
        return (w @ x[:, 0]) / w.sum(axis=1)


class Proportion(Mean):
    """Accuracy (acc@1, acc@k): the mean of 0/1 outcomes, so a Wilson interval applies. Columns: (correct,)."""

    name, columns, proportion = "proportion", ("correct",), True


class MeanPerClassRecall(Statistic):
    """Balanced accuracy: mean over the classes present (in the resample) of their recall.
    Columns: (true class, correct)."""

    name, columns = "mean_per_class_recall", ("target", "correct")

    def __call__(self, x, w):
        tot_m, _ = _indicator(x[:, 0])
        hit_m, _ = _indicator(x[:, 0], x[:, 1])
        tot, hit = _per_class(tot_m, w), _per_class(hit_m, w)
        present = tot > 0
        rec = np.divide(hit, tot, out=np.zeros_like(hit), where=present)
        return rec.sum(axis=1) / present.sum(axis=1)


@dataclass(frozen=True, repr=True)
class WorstGroup(Statistic):
    """Lowest accuracy over the groups present (WILDS / fairness), never an excluded group.
    Columns: (group, correct) - correct is top-k correct for top-k group metrics."""

    exclude: tuple[int, ...] = ()
    name = "worst_group"
    columns = ("group", "correct")

    def __call__(self, x, w):
        tot_m, groups = _indicator(x[:, 0])
        hit_m, _ = _indicator(x[:, 0], x[:, 1])
        tot, hit = _per_class(tot_m, w), _per_class(hit_m, w)
        present = (tot > 0) & ~np.isin(groups, self.exclude)[None, :]
        acc = np.divide(hit, tot, out=np.full_like(hit, np.inf), where=present)
        worst = acc.min(axis=1)
        return np.where(np.isfinite(worst), worst, np.nan)


class F1Macro(Statistic):
    """Macro F1 over the classes present in the (resampled) targets, zero_division=0 (WILDS' F1-macro).
    Columns: (true class, predicted class)."""

    name, columns = "f1_macro", ("target", "pred")

    def __call__(self, x, w):
        labels = np.unique(x[:, :2])
        t = np.searchsorted(labels, x[:, 0])
        p = np.searchsorted(labels, x[:, 1])
        k, c = len(x), len(labels)
        ks = np.arange(k)
        rows = sparse.csr_matrix((np.ones(k), (t, ks)), shape=(c, k))
        cols = sparse.csr_matrix((np.ones(k), (p, ks)), shape=(c, k))
        diag = sparse.csr_matrix(((t == p).astype(np.float64), (t, ks)), shape=(c, k))
        r, pr, tp = _per_class(rows, w), _per_class(cols, w), _per_class(diag, w)
        present = r > 0
        f1 = np.divide(2 * tp, r + pr, out=np.zeros_like(tp), where=present)
        return f1.sum(axis=1) / present.sum(axis=1)


@dataclass(frozen=True, repr=True)
class RetrievalRecall(Statistic):
    """Retrieval recall@k (or MRR) with the image as resampling unit (its captions travel with it).
    Columns: (captions of the image, captions whose query ranked the image < k, image query hit@k); for MRR the
    hits are reciprocal ranks (their sum over the image's captions, the image query's 1/(rank+1)).
    which = "mean" (DataComp's mean_recall@1: mean of both ways), "image" (text->image) or "text"."""

    which: str = "mean"
    name = "retrieval_recall"
    columns = ("n_captions", "caption_hits", "image_hit")

    def __call__(self, x, w):
        w = np.asarray(w, dtype=np.float64)
        image_ret = (w @ x[:, 1]) / (w @ x[:, 0])
        text_ret = (w @ x[:, 2]) / w.sum(axis=1)
        return {"mean": 0.5 * (image_ret + text_ret), "image": image_ret, "text": text_ret}[self.which]


class SubsetMean(Statistic):
    """Mean of a per-item value over the items in a subset (WinoGAViL's jaccard_score_10-12: instances
    with 10 or 12 candidates). Columns: (in subset, value)."""

    name, columns = "subset_mean", ("in_subset", "value")

    def __call__(self, x, w):
        w = np.asarray(w, dtype=np.float64)
        den = w @ x[:, 0]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, (w @ (x[:, 0] * x[:, 1])) / den, np.nan)


# ------------------------------------------------------------------------------------------- results

@dataclass(frozen=True)
class Interval:
    """An estimate and its interval; `n` = items (item methods) or seeds (seed methods)."""

    estimate: float
    low: float
    high: float
    level: float
    method: str
    draws: int | None
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Difference:
    """x - y with its interval and two-sided p-value; `n_x`, `n_y` = items or seeds per side."""

    estimate: float
    low: float
    high: float
    p_value: float
    level: float
    method: str
    draws: int | None
    n_x: int
    n_y: int

    def as_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------- items

@dataclass
class TaskCells:
    """One task's items reduced to cells, ready to bootstrap. Build with `TaskCells.of(stat, columns)`."""

    stat: Statistic
    x: np.ndarray
    counts: np.ndarray

    @classmethod
    def of(cls, stat: Statistic, columns) -> "TaskCells":
        x, counts = cells(columns)
        return cls(stat, x, counts)

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    @property
    def estimate(self) -> float:
        return float(self.stat(self.x, self.counts[None, :])[0])

    def draws(self, draws: int, rng: np.random.Generator) -> np.ndarray:
        """(draws,) values of the statistic on item resamples (multinomial cell counts, in blocks)."""
        return _bootstrap(lambda w: self.stat(self.x, w), self.counts, draws, rng)


@dataclass
class PairedCells:
    """Two models' items on the same eval set, aligned item by item and reduced to joint cells."""

    stat: Statistic
    x: np.ndarray  # (K, 2F): the first F columns are model x's, the rest model y's
    counts: np.ndarray

    @classmethod
    def of(cls, stat: Statistic, columns_x, columns_y) -> "PairedCells":
        cx = np.asarray(columns_x, dtype=np.float64).reshape(len(columns_x), -1)
        cy = np.asarray(columns_y, dtype=np.float64).reshape(len(columns_y), -1)
        if cx.shape != cy.shape:
            raise ValueError(f"paired items need the same items on both sides ({cx.shape} vs {cy.shape})")
        x, counts = cells(np.hstack([cx, cy]))
        return cls(stat, x, counts)

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    def _diff(self, w):
        f = self.x.shape[1] // 2
        return self.stat(self.x[:, :f], w) - self.stat(self.x[:, f:], w)

    @property
    def estimate(self) -> float:
        return float(self._diff(self.counts[None, :])[0])

    def draws(self, draws: int, rng: np.random.Generator) -> np.ndarray:
        return _bootstrap(self._diff, self.counts, draws, rng)


def _bootstrap(fn, counts: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    block = max(1, _BLOCK // max(1, len(counts)))
    out = [fn(multinomial(counts, min(block, draws - i), rng)) for i in range(0, draws, block)]
    return np.concatenate(out)


def percentile(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Equal-tailed percentile interval of bootstrap draws (NaN draws - an empty resample - ignored)."""
    a = (1 - level) / 2
    lo, hi = np.nanquantile(values, [a, 1 - a])
    return float(lo), float(hi)


def wilson(k, n, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for k successes of n (vectorised over arrays of k, n)."""
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    z = sps.norm.ppf(0.5 + level / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


def _rng(seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def task_interval(task: TaskCells, level: float = LEVEL, draws: int = DRAWS, seed=0,
                  method: str = "auto") -> Interval:
    """Interval of one task's metric over items.

    method "auto": Wilson for a plain proportion, percentile bootstrap otherwise; "percentile": the
    bootstrap always; "wilson": Wilson (proportions only).
    """
    if method not in ("auto", "percentile", "wilson"):
        raise ValueError(f"unknown interval method {method!r}")
    if method == "wilson" or (method == "auto" and task.stat.proportion):
        if not task.stat.proportion:
            raise ValueError(f"the Wilson interval is for proportions, not {task.stat!r}")
        k = float(task.x[:, 0] @ task.counts)
        lo, hi = wilson(k, task.n, level)
        return Interval(task.estimate, float(lo), float(hi), level, "wilson score", None, task.n)
    lo, hi = percentile(task.draws(draws, _rng(seed)), level)
    return Interval(task.estimate, lo, hi, level, "percentile bootstrap over items (multinomial cells)", draws, task.n)


def _mean_of_independent_draws(tasks: list, draws: int, seed) -> np.ndarray:
    """Bootstrap draws of the unweighted mean over tasks, each task (TaskCells or PairedCells) resampled
    independently with its own child of `seed`."""
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(_seed_int(seed)).spawn(len(tasks))]
    total = np.zeros(draws)
    for t, r in zip(tasks, rngs):
        total += t.draws(draws, r)
    return total / len(tasks)


def suite_interval(tasks: list[TaskCells], level: float = LEVEL, draws: int = DRAWS, seed=0) -> Interval:
    """Interval of the unweighted mean over tasks (DataComp's average), each task resampled independently."""
    if not tasks:
        raise ValueError("suite_interval of no task")
    lo, hi = percentile(_mean_of_independent_draws(tasks, draws, seed), level)
    est = float(np.mean([t.estimate for t in tasks]))
    return Interval(est, lo, hi, level, "percentile bootstrap over items, tasks resampled independently",
                    draws, sum(t.n for t in tasks))


def intervals(tasks: dict[str, TaskCells], level: float = LEVEL, draws: int = DRAWS, seed=0,
              method: str = "auto") -> dict:
    """Per-task intervals and the suite average's, drawing each task's bootstrap once for both.

    Returns {"tasks": {name: Interval}, "average": Interval}; the average is the unweighted mean over
    `tasks` (DataComp's rule), each task resampled independently. This is the call for a whole result
    (38 tasks, 727k items, 10,000 draws: perf/bench_stats.py).
    """
    if not tasks:
        raise ValueError("intervals of no task")
    names = list(tasks)
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(_seed_int(seed)).spawn(len(names))]
    total = np.zeros(draws)
    out = {}
    for name, r in zip(names, rngs):
        t = tasks[name]
        d = t.draws(draws, r)
        total += d
        if method == "percentile" or (method == "auto" and not t.stat.proportion):
            lo, hi = percentile(d, level)
            out[name] = Interval(t.estimate, lo, hi, level, "percentile bootstrap over items (multinomial cells)",
                                 draws, t.n)
        else:
            out[name] = task_interval(t, level, draws, seed, method)
    lo, hi = percentile(total / len(names), level)
    avg = Interval(float(np.mean([tasks[n].estimate for n in names])), lo, hi, level,
                   "percentile bootstrap over items, tasks resampled independently", draws,
                   sum(tasks[n].n for n in names))
    return {"tasks": out, "average": avg}


def _seed_int(seed) -> int:
    if isinstance(seed, np.random.Generator):
        return int(seed.integers(0, 2**63 - 1))
    return int(seed)


def _bootstrap_p(d: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "difference = 0": twice the smaller tail share at 0 (+1 smoothing),
    the p-value whose < 1 - level matches 0 falling outside the percentile interval."""
    d = d[~np.isnan(d)]
    b = len(d)
    return float(min(1.0, 2 * min((1 + np.sum(d <= 0)) / (b + 1), (1 + np.sum(d >= 0)) / (b + 1))))


def paired_items(pair: PairedCells, level: float = LEVEL, draws: int = DRAWS, seed=0) -> Difference:
    """Item-level difference (model x - model y) on one task, items resampled jointly for both models."""
    d = pair.draws(draws, _rng(seed))
    lo, hi = percentile(d, level)
    return Difference(pair.estimate, lo, hi, _bootstrap_p(d), level,
                      "paired percentile bootstrap over items", draws, pair.n, pair.n)


def paired_suite(pairs: list[PairedCells], level: float = LEVEL, draws: int = DRAWS, seed=0) -> Difference:
    """Item-level difference of the mean over tasks (x - y), tasks resampled independently."""
    if not pairs:
        raise ValueError("paired_suite of no task")
    d = _mean_of_independent_draws(pairs, draws, seed)
    lo, hi = percentile(d, level)
    n = sum(p.n for p in pairs)
    return Difference(float(np.mean([p.estimate for p in pairs])), lo, hi, _bootstrap_p(d), level,
                      "paired percentile bootstrap over items, tasks resampled independently", draws, n, n)


# ------------------------------------------------------------------------------------------- seeds

def t_interval(values, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, low, high) of the t interval over the last axis (per-seed scores); NaN bounds with 1 seed."""
    v = np.asarray(values, dtype=np.float64)
    k = v.shape[-1]
    mean = v.mean(axis=-1)
    if k < 2:
        nan = np.full_like(mean, np.nan)
        return mean, nan, nan
    half = sps.t.ppf(0.5 + level / 2, k - 1) * v.std(axis=-1, ddof=1) / np.sqrt(k)
    return mean, mean - half, mean + half


def seed_interval(values, level: float = LEVEL) -> Interval:
    """A recipe's score over training seeds: t interval on the per-seed scores (valid from 2 seeds; with
    one seed the bounds are NaN - seed variance is unknown)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    m, lo, hi = t_interval(v, level)
    return Interval(float(m), float(lo), float(hi), level, "t over seeds", None, len(v))


def pooled_t(x, y, level: float = LEVEL):
    """Two-sample t on the last axis with a pooled seed variance: (diff x-y, low, high, p, df, sd).

    Vectorised over leading axes. Needs len(x) + len(y) >= 3 (one side may have a single seed; the
    seed variance then comes from the other side); otherwise every output is NaN.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    kx, ky = x.shape[-1], y.shape[-1]
    diff = x.mean(axis=-1) - y.mean(axis=-1)
    df = kx + ky - 2
    if df < 1:
        nan = np.full_like(diff, np.nan)
        return diff, nan, nan, nan, np.nan, nan
    ss = (x.var(axis=-1, ddof=0) * kx) + (y.var(axis=-1, ddof=0) * ky)
    sd = np.sqrt(ss / df)
    se = sd * np.sqrt(1 / kx + 1 / ky)
    half = sps.t.ppf(0.5 + level / 2, df) * se
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, diff / se, np.where(diff == 0, 0.0, np.inf * np.sign(diff)))
    p = 2 * sps.t.sf(np.abs(t), df)
    return diff, diff - half, diff + half, p, df, sd


def seed_difference(x, y, level: float = LEVEL) -> Difference:
    """Recipe x - recipe y over training seeds (two-sample t, pooled seed variance, df = kx + ky - 2).

    Pooled rather than Welch: seed variance is a property of the training protocol at a scale, and with
    3 seeds a side Welch's estimated df throws away a quarter of the power (0.22 vs 0.29 at effect 1.5 sd)
    while the pooled test has exactly the power `power_two_sample` predicts. With equal seeds per side it
    is also robust to unequal variances.
    """
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    d, lo, hi, p, _, _ = pooled_t(x, y, level)
    return Difference(float(d), float(lo), float(hi), float(p), level, "two-sample t over seeds (pooled variance)",
                      None, len(x), len(y))


def pooled_sd(x, y) -> float:
    """Pooled seed standard deviation of two sides (NaN when neither side has 2 seeds)."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    df = len(x) + len(y) - 2
    if df < 1:
        return float("nan")
    return float(np.sqrt((x.var() * len(x) + y.var() * len(y)) / df))


def power_two_sample(k, sd, effect, alpha: float = 1 - LEVEL):
    """Power of the pooled two-sample t test with k seeds a side to detect a true difference `effect`
    when the seed standard deviation is `sd` (exact, noncentral t; vectorised over k)."""
    k = np.asarray(k, dtype=np.float64)
    df = 2 * k - 2
    nc = np.abs(effect) / (sd * np.sqrt(2 / k))
    tc = sps.t.ppf(1 - alpha / 2, df)
    return sps.nct.sf(tc, df, nc) + sps.nct.cdf(-tc, df, nc)


def seeds_for_power(sd: float, effect: float, power: float = POWER, alpha: float = 1 - LEVEL,
                    cap: int = SEED_CAP) -> int | None:
    """Fewest seeds per side (2..cap) for `power` to detect `effect`; None when more than `cap` are
    needed (show it as "> cap") or the seed sd is unknown (NaN)."""
    if not np.isfinite(sd) or effect == 0:
        return None
    if sd == 0:
        return 2
    ks = np.arange(2, cap + 1)
    ok = np.nonzero(power_two_sample(ks, sd, effect, alpha) >= power)[0]
    return int(ks[ok[0]]) if len(ok) else None


# ------------------------------------------------------------------------------------------- several tests

def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control); NaN entries are not tests."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.nonzero(~np.isnan(p))[0]
    m = len(ok)
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(1.0, adj)
    return out
