"""``semdedup``: SemDeDup (Abbas et al., 2023), semantic deduplication within k-means clusters.

Recipe: ``semdedup: {clusters: K, eps: 0.05, keep: closest_to_centroid}``

As in the paper: k-means (FAISS, spherical, seeded) on the L2-normalised embeddings; inside each
cluster the members are ordered by cosine similarity to their centroid and a member is removed when
its similarity to any member *before it* in that order exceeds ``1 - eps``. With
``keep: closest_to_centroid`` the order is most central first, so of every near-identical set the
member closest to the centroid survives (the issue's rule); ``farthest_from_centroid`` is the
paper's other option (it keeps the "hard", less prototypical examples).

Unlike `dedup` this is not transitive: a member is compared with every earlier member (removed or
not), exactly as the paper's ``max(triu(X Xᵀ))`` rule. Pairs that k-means puts in different
clusters are not compared (the paper's approximation that makes it scale).

``clusters`` defaults to about one cluster per 1,000 rows (within-cluster comparisons then cost
~1,000·n·d, like the paper's 50,000 clusters for 440M images at its scale). Rows without an
embedding are kept untouched (score NaN). Ties in the order fall back to pool order (uid), so the
result is deterministic for a given seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from curate.lib import collapse
from filters.base import Batch, Filter, StepResult, register
from filters.common import EmbeddingParams, column, normalise, pool_order

BLOCK_ELEMENTS = 1 << 24  # similarity entries computed per block (64 MiB of float32)


def kmeans_assign(x: np.ndarray, k: int, seed: int, niter: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means with FAISS; returns (cluster of each row, unit centroids)."""
    import faiss

    n, d = x.shape
    k = max(1, min(k, n))
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=256, min_points_per_centroid=1)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    cent = km.centroids / np.maximum(np.linalg.norm(km.centroids, axis=1, keepdims=True), 1e-12)
    _, assign = km.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return assign[:, 0].astype(np.int64), cent.astype(np.float32)


def max_sim_to_earlier(xc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows of xc (in order), the max cosine to any earlier row and which row that is.

    Computed in column blocks of the upper triangle so memory stays bounded for big clusters.
    Row 0 gets -inf / -1.
    """
    m = len(xc)
    best = np.full(m, -np.inf, dtype=np.float32)
    arg = np.full(m, -1, dtype=np.int64)
    block = max(1, BLOCK_ELEMENTS // max(m, 1))
    for s in range(1, m, block):
        e = min(m, s + block)
        sims = xc[:e] @ xc[s:e].T  # (e, e - s): earlier rows x this block's rows
        rows = np.arange(e)[:, None]
        cols = np.arange(s, e)[None, :]
        sims[rows >= cols] = -np.inf  # only strictly earlier rows count
        a = sims.argmax(axis=0)
        best[s:e] = sims[a, np.arange(e - s)]
        arg[s:e] = a
    return best, arg


@register
class SemDedupFilter(Filter):
    """SemDeDup: remove semantic near-duplicates inside k-means clusters of the embeddings."""

    name = "semdedup"
    scope = "pool"
    columns = ()
    embeddings = ("image", "text")

    @dataclass
    class Params(EmbeddingParams):
        clusters: int | None = field(default=None, metadata={"min": 1})  # None: ~1 per 1,000 rows
        eps: float = field(default=0.05, metadata={"min": 0.0, "max": 2.0})
        keep: Literal["closest_to_centroid", "farthest_from_centroid"] = "closest_to_centroid"
        on: Literal["image", "text"] = "image"

    def __init__(self, params):
        super().__init__(params)
        self.seed = 0
        self.n_clusters = 0
        self.model_id: str | None = None
        self.embeddings = (params.on,)  # what these params read (the class declares the superset)

    def setup(self, context) -> None:
        self.seed = int(context.get("seed") or 0)
        self.model_id = context.get("model_id")

    def apply(self, batch: Batch) -> StepResult:
        p = self.params
        n = len(batch)
        emb = batch.image_emb if p.on == "image" else batch.text_emb
        if emb is None:
            raise ValueError(f"semdedup on {p.on} needs {p.on} embeddings")
        x, ok = normalise(emb)
        uids = column(batch.table, "uid").to_pylist()
        rank = pool_order(batch.table)
        keep = np.ones(n, dtype=bool)
        score = np.full(n, np.nan)
        reason: list[str | None] = [None] * n
        rows = np.flatnonzero(ok)
        if len(rows) < 2:
            return StepResult(keep=keep, score=score, reason=reason, threshold=1.0 - p.eps)
        # a collapsed space puts every row within eps of another: refuse it (curate/lib/collapse.py)
        collapse.check_not_collapsed(x[rows], f"semdedup on {p.on} embeddings", self.model_id, self.seed)
        k = p.clusters or max(1, math.ceil(len(rows) / 1000))
        assign, cent = kmeans_assign(x[rows], k, self.seed)
        self.n_clusters = len(cent)
        to_centroid = np.einsum("ij,ij->i", x[rows], cent[assign])
        sign = -1.0 if p.keep == "closest_to_centroid" else 1.0
        # Group by cluster; within a cluster by the keep order, then pool order.
        order = np.lexsort((rank[rows], sign * to_centroid, assign))
        bounds = np.flatnonzero(np.diff(assign[order])) + 1
        for members in np.split(order, bounds):
            if len(members) < 2:
                continue
            idx = rows[members]
            best, arg = max_sim_to_earlier(x[idx])
            score[idx[1:]] = best[1:]
            drop = best > 1.0 - p.eps
            c = int(assign[members[0]])
            for r, a, s in zip(idx[drop].tolist(), arg[drop].tolist(), best[drop].tolist()):
                keep[r] = False
                reason[r] = f"semantic duplicate of {uids[idx[a]]} (cosine {s:.3f}, cluster {c})"
        return StepResult(keep=keep, score=score, reason=reason, threshold=1.0 - p.eps)
