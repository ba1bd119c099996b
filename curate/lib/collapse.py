"""Is an embedding space collapsed? Checked before a dedup step trusts cosine similarities.

A scorer trained here can collapse (every image mapped near one direction, or onto a line). Dedup then reads
"cosine >= 0.95" as "duplicate" for most of the pool and silently deletes it. Two numbers on a seeded sample
of the vectors catch both failure modes:

- mean off-diagonal cosine: the average cosine between two different rows. Near 1 means the vectors point
  the same way (a trained tiny CLIP on the offline pool sits around 0.1-0.5; random vectors near 0).
- participation ratio of the centred covariance's eigenvalues, (sum l)^2 / sum l^2: the effective number of
  dimensions the rows spread over. 1 means they lie on a line (dimensional collapse) even when their mean
  cosine is moderate.

The space is called collapsed when the mean cosine is >= `MAX_MEAN_COSINE` (0.95: then a typical pair of
unrelated rows already passes DataComp-style dedup's 0.95 cut, so the whole pool would merge into a few groups)
or the participation ratio is < `MIN_PARTICIPATION_RATIO` (2: the rows spread over fewer than two directions).
Both are far from what a trained model gives, so the check does not fire on healthy but crowded spaces: those
(say, every pair near 0.9) get `faiss_index.warn_if_collapsed`'s warning only. Fewer than `MIN_ROWS` valid rows are not judged: the numbers of
a handful of rows say nothing about a model.
"""

from __future__ import annotations

import numpy as np

from curate.core.errors import CurateError

MAX_MEAN_COSINE = 0.95
MIN_PARTICIPATION_RATIO = 2.0
MIN_ROWS = 64
SAMPLE_ROWS = 4096


def collapse_stats(x: np.ndarray, seed: int = 0, sample: int = SAMPLE_ROWS) -> dict:
    """{n, sampled, mean_cosine, participation_ratio} of the rows of `x` on a seeded sample (rows with NaN
    dropped). The sample is drawn first, so a 12.8M-row pool costs no pool-sized temporary."""
    x = x if hasattr(x, "shape") else np.asarray(x)  # arrays, or row readers such as faiss_index.UnitRows
    n = len(x)
    idx = np.arange(n) if n <= sample else np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    u = np.asarray(x[idx], dtype=np.float64).reshape(len(idx), -1)
    u = u[np.isfinite(u).all(axis=1)]
    m = len(u)
    if m < 2:
        return {"n": int(n), "sampled": int(m), "mean_cosine": float("nan"), "participation_ratio": float("nan")}
    u = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    s = u.sum(axis=0)
    # sum over i != j of u_i . u_j = |sum u|^2 - sum |u_i|^2, without the m x m matrix
    mean_cos = float((s @ s - (u * u).sum()) / (m * (m - 1)))
    c = u - u.mean(axis=0)
    lam = np.clip(np.linalg.eigvalsh(c.T @ c / m), 0.0, None)
    pr = float(lam.sum() ** 2 / (lam ** 2).sum()) if (lam ** 2).sum() > 0 else 0.0
    return {"n": int(n), "sampled": int(m), "mean_cosine": round(mean_cos, 6), "participation_ratio": round(pr, 4)}


def check_not_collapsed(x: np.ndarray, what: str, model_id: str | None, seed: int = 0) -> dict:
    """Raise CurateError naming `model_id` and the numbers when the rows of `x` are collapsed; return the stats."""
    st = collapse_stats(x, seed)
    if st["sampled"] < MIN_ROWS:
        return {**st, "checked": False}
    bad = []
    if st["mean_cosine"] >= MAX_MEAN_COSINE:
        bad.append(f"mean off-diagonal cosine {st['mean_cosine']:.3f} >= {MAX_MEAN_COSINE}")
    if st["participation_ratio"] < MIN_PARTICIPATION_RATIO:
        bad.append(f"participation ratio {st['participation_ratio']:.2f} < {MIN_PARTICIPATION_RATIO}")
    if bad:
        raise CurateError(
            f"{what}: the embeddings of {model_id or 'this model'} are collapsed ({'; '.join(bad)}, on "
            f"{st['sampled']} sampled of {st['n']} rows): cosine similarity cannot tell duplicates apart, so "
            "this step would drop most of the pool. Retrain or pick another scorer (curate/lib/collapse.py "
            "documents the thresholds)")
    return {**st, "checked": True}
