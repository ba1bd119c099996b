"""``clip_score``: keep rows whose image-text cosine similarity passes a threshold or is in the top fraction.

DataComp's "CLIP score (L/14 30%)" and "(B/32 30%)" baselines are ``keep_top_fraction: 0.3`` with the
matching embeddings. The fraction is of every row that reaches this step across the whole pool
(the runner hands a pool-scope filter all of them at once, only the uid and score columns).

Ties: we keep exactly ``floor(N * fraction)`` rows, ordered by score descending then uid ascending,
so the count is exact and the result does not depend on shard order. DataComp's reference instead
sets ``threshold = sorted_desc[floor(N * fraction)]`` and keeps every row with ``score >=
threshold`` (one row more, plus ties); ``datacomp_ties: true`` reproduces that rule exactly.
Rows without a score (image not embeddable) are dropped with reason ``no clip score``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from filters.base import Batch, Filter, StepResult, register
from filters.common import EmbeddingParams, column


def top_fraction_keep(uid: pa.Array, score: pa.Array, fraction: float, datacomp_ties: bool = False) -> tuple[np.ndarray, float]:
    """Keep mask for the top `fraction` of rows by score (ties by uid ascending) and the cut score."""
    n = len(score)
    keep = np.zeros(n, dtype=bool)
    s = pc.fill_null(score, float("nan")).to_numpy(zero_copy_only=False).astype(np.float64)
    finite = ~np.isnan(s)
    k = int(np.floor(n * fraction + 1e-9))
    if n == 0 or not finite.any():
        return keep, float("nan")
    if datacomp_ties:
        desc = -np.sort(-s[finite])
        thr = float(desc[min(k, len(desc) - 1)])
        keep = finite & (s >= thr)
        return keep, thr
    t = pa.table({"s": pa.array(np.where(finite, s, np.nan)), "u": uid})
    # Arrow's sort is stable, multi-key and puts NaN/null last: exact and deterministic.
    order = pc.sort_indices(t, sort_keys=[("s", "descending"), ("u", "ascending")])
    order = order.to_numpy()
    k = min(k, int(finite.sum()))
    keep[order[:k]] = True
    thr = float(s[order[k - 1]]) if k > 0 else float("inf")
    return keep, thr


@register
class ClipScoreFilter(Filter):
    """Keep image-text pairs the scoring CLIP model finds similar (threshold or top fraction)."""

    name = "clip_score"
    scope = "pool"
    columns = ("clip_score",)

    @dataclass
    class Params(EmbeddingParams):
        threshold: float | None = field(default=None, metadata={"min": -1.0, "max": 1.0})
        keep_top_fraction: float | None = field(default=None, metadata={"gt": 0.0, "max": 1.0})
        datacomp_ties: bool = False

        def check(self) -> None:
            super().check()
            if (self.threshold is None) == (self.keep_top_fraction is None):
                raise ValueError("threshold: give exactly one of threshold or keep_top_fraction")

    def apply(self, batch: Batch) -> StepResult:
        return select_by_score(batch, column(batch.table, "clip_score"), self.params, "clip score", "")


def select_by_score(batch: Batch, score, p, label: str, by: str) -> StepResult:
    """The threshold / top-fraction rule shared by ``clip_score`` and ``score``; `label` names the score in the
    drop reasons ("no LABEL", "LABEL < cut"), `by` is appended to the top-fraction reason (" by itm_score")."""
    s = pc.fill_null(score, float("nan")).to_numpy(zero_copy_only=False).astype(np.float64)
    if p.keep_top_fraction is not None:
        keep, thr = top_fraction_keep(column(batch.table, "uid"), score, p.keep_top_fraction, p.datacomp_ties)
    else:
        thr = p.threshold
        keep = ~np.isnan(s) & (s >= thr)
    reason = np.full(len(s), None, dtype=object)
    reason[np.isnan(s)] = f"no {label}"
    reason[~keep & ~np.isnan(s)] = f"{label} < {thr:.4f}" if p.keep_top_fraction is None else \
        f"not in top {p.keep_top_fraction:g}{by} (cut {thr:.4f})"
    return StepResult(keep=keep, score=s, reason=reason, threshold=thr)
