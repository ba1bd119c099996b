"""``dedup``: drop exact and near duplicates, keeping exactly one member of each duplicate group.

Recipe: ``dedup: {on: image|text|both, threshold: 0.95, index: auto|flat|ivf, keep: first|highest_clip_score}``

1. Exact duplicates: equal ``sha256`` of the image bytes (``on: image``), equal normalised caption
   (``on: text``), or both equal (``on: both``). Only one representative per exact group goes on
   to step 2, so a pool with 10,000 copies of one logo costs one vector, not 10,000.
2. Near duplicates: cosine similarity of the L2-normalised embeddings >= ``threshold``, found by a
   FAISS k-nearest-neighbour search (`curate.lib.faiss_index`: exact for small pools, IVF for large, GPU
   when available). ``on: both`` pairs are found on the image embeddings and must also pass the
   threshold on the text embeddings (same picture *and* same meaning).
3. Groups are the connected components of the union of both graphs, so duplication is transitive:
   if A~B and B~C, then A, B and C form one group even when A and C are less similar.
4. One member per group is kept: ``first`` = earliest in the pool (by shard, then key, then uid),
   ``highest_clip_score`` = largest CLIP score (ties and missing scores fall back to ``first``).
   Every dropped row's reason names the kept member's uid; its score is its cosine similarity to
   the kept member (1.0 for exact copies), which may be below the threshold for members joined
   through a chain.

Rows without an embedding (undecodable image) take part only in the exact step. The result depends
only on the rows and the seed, never on batch order: the same input gives the same kept set.

Memory: besides the batch's own vectors, the step holds O(n * k) numbers, not another (n, d) copy: the rows
are normalised as they are read (`faiss_index.UnitRows`) and the IVF self-join reads them from the batch's
matrix (perf/RESULTS.md, "Dedup memory: the filter alone").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.lib import collapse, faiss_index
from filters.base import Batch, Filter, StepResult, register
from filters.common import EmbeddingParams, column, normalise_text, pool_order


def exact_codes(table: pa.Table, on: str) -> np.ndarray:
    """Group code per row for exact duplicates (-1 = no key, e.g. a failed row without sha256)."""
    parts = []
    if on in ("image", "both"):
        sha = column(table, "sha256")
        if sha is None:
            raise ValueError("dedup needs the pool metadata column sha256")
        parts.append(sha.cast(pa.string()))
    if on in ("text", "both"):
        text = column(table, "text")
        if text is None:
            raise ValueError("dedup on text needs the column text")
        parts.append(normalise_text(text.cast(pa.string())))
    key = parts[0] if len(parts) == 1 else pc.binary_join_element_wise(parts[0], parts[1], "\x00")
    enc = key.dictionary_encode()
    codes = enc.indices.to_numpy(zero_copy_only=False)
    valid = pc.is_valid(key).to_numpy(zero_copy_only=False)
    codes = np.where(valid, codes, -1).astype(np.int64)
    return codes


def group_keep(labels: np.ndarray, rank: np.ndarray, preference: np.ndarray | None) -> np.ndarray:
    """Index of the kept member for each row's group.

    preference: higher is better (e.g. clip score, NaN = worst); ties and None -> lowest rank.
    """
    n = len(labels)
    pref = np.zeros(n) if preference is None else np.where(np.isnan(preference), -np.inf, preference)
    # Sort by group, then best preference first, then earliest rank; first row per group wins.
    order = np.lexsort((rank, -pref, labels))
    first = np.ones(n, dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    winners = order[first]  # one per group, in ascending label order
    return winners[np.searchsorted(labels[winners], labels)]


@register
class DedupFilter(Filter):
    """Exact (sha256) then near (embedding cosine) deduplication; one kept member per group."""

    name = "dedup"
    scope = "pool"
    # The runner reads the class-level declaration: the superset of what any params need.
    columns = ("sha256", "text", "shard", "key", "clip_score")
    embeddings = ("image", "text")

    @dataclass
    class Params(EmbeddingParams):
        on: Literal["image", "text", "both"] = "image"
        threshold: float = field(default=0.95, metadata={"min": -1.0, "max": 1.0})
        index: Literal["auto", "flat", "ivf"] = "auto"
        keep: Literal["first", "highest_clip_score"] = "first"
        neighbors: int = field(default=faiss_index.DEFAULT_K, metadata={"min": 2, "max": 1024})
        nprobe: int | None = field(default=None, metadata={"min": 1})

    def __init__(self, params):
        super().__init__(params)
        self.seed = 0
        self.model_id: str | None = None
        self.last_index: faiss_index.IndexChoice | None = None
        # What these params actually read (a runner that honours instance declarations loads less).
        on = params.on
        self.embeddings = ("image", "text") if on == "both" else (on,)
        self.columns = ("sha256", "shard", "key") + (("text",) if on != "image" else ()) + (
            ("clip_score",) if params.keep == "highest_clip_score" else ())

    def setup(self, context) -> None:
        self.seed = int(context.get("seed") or 0)
        self.model_id = context.get("model_id")

    def _vectors(self, batch: Batch, which: str) -> np.ndarray:
        x = batch.image_emb if which == "image" else batch.text_emb
        if x is None:
            raise ValueError(f"dedup on {self.params.on} needs {which} embeddings")
        return x

    def apply(self, batch: Batch) -> StepResult:
        p = self.params
        table = batch.table
        n = len(batch)
        rank = pool_order(table)

        # 1. exact groups, linked as stars to their first member.
        codes = exact_codes(table, p.on)
        has = codes >= 0
        order = np.lexsort((rank, codes))
        order = order[has[order]]
        c_sorted = codes[order]
        head = np.ones(len(order), dtype=bool)
        head[1:] = c_sorted[1:] != c_sorted[:-1]
        head_of = np.maximum.accumulate(np.where(head, np.arange(len(order)), 0))
        ei, ej = order[head_of], order
        non_self = ei != ej
        ei, ej = ei[non_self], ej[non_self]
        # Rows that go on to the near step: one per exact group plus rows without an exact key.
        rep = np.ones(n, dtype=bool)
        rep[ej] = False

        # 2. near pairs on embeddings among representatives. The vectors are normalised as they are read
        # (faiss_index.UnitRows): a normalised copy would be another 2 GiB at 1M x 512 (issue 20).
        primary = "text" if p.on == "text" else "image"
        x = faiss_index.UnitRows(self._vectors(batch, primary))
        ok = x.ok.copy()
        secondary = None
        if p.on == "both":
            secondary = faiss_index.UnitRows(self._vectors(batch, "text"))
            ok &= secondary.ok
        cand = np.flatnonzero(rep & ok)
        ni = nj = np.empty(0, dtype=np.int64)
        if len(cand) > 1:
            xc = x if len(cand) == n else x.subset(cand)  # no copy either way
            # a collapsed space makes every pair a "duplicate": refuse it (curate/lib/collapse.py) before the search
            collapse.check_not_collapsed(xc, f"dedup on {primary} embeddings", self.model_id, self.seed)
            faiss_index.warn_if_collapsed(xc, p.threshold, "dedup")
            i, j, _, choice = faiss_index.near_pairs(xc, p.threshold, p.index, p.neighbors, self.seed, p.nprobe)
            del xc
            self.last_index = choice
            ni, nj = cand[i], cand[j]
            if secondary is not None and len(ni):
                tsim = pair_cosines(secondary, ni, nj)
                ni, nj = ni[tsim >= p.threshold], nj[tsim >= p.threshold]

        # 3. groups = connected components of exact + near edges.
        labels = faiss_index.connected_components(n, np.concatenate([ei, ni]), np.concatenate([ej, nj]))
        pref = None
        if p.keep == "highest_clip_score":
            cs = column(table, "clip_score")
            if cs is None:
                raise ValueError("keep: highest_clip_score needs the clip_score column (embeddings)")
            pref = pc.fill_null(cs.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)
        keeper = group_keep(labels, rank, pref)

        # 4. decisions: similarity of each dropped row to its kept member.
        keep = keeper == np.arange(n)
        dropped = np.flatnonzero(~keep)
        score = np.full(n, np.nan)
        k_of = keeper[dropped]
        sim = pair_cosines(x, dropped, k_of).astype(np.float64)
        if secondary is not None:
            sim = np.minimum(sim, pair_cosines(secondary, dropped, k_of))
        same_exact = (codes[dropped] >= 0) & (codes[dropped] == codes[k_of])
        sim = np.where(same_exact, 1.0, sim)
        sim = np.where(ok[dropped] & ok[k_of] | same_exact, sim, np.nan)
        score[dropped] = sim
        sizes = np.bincount(labels, minlength=labels.max() + 1 if n else 0)
        reason: list[str | None] = [None] * n
        exact_what = {"image": "same sha256", "text": "same caption", "both": "same sha256 and caption"}[p.on]
        # only the kept members' uids as Python strings, not the whole column (~90 MB at 1M rows)
        kept_uids = column(table, "uid").take(pa.array(k_of, pa.int64())).to_pylist()
        for r, u, s, ex in zip(dropped.tolist(), kept_uids, sim.tolist(), same_exact.tolist()):
            how = exact_what if ex else f"cosine {s:.3f}"
            reason[r] = f"duplicate of {u} ({how}; group of {sizes[labels[r]]})"
        return StepResult(keep=keep, score=score, reason=reason, threshold=p.threshold)


def pair_cosines(x: faiss_index.UnitRows, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 cosine of rows a[t] and b[t] of `x`, `faiss_index.ROW_CHUNK` pairs at a time (bounded temporaries)."""
    chunk = faiss_index.ROW_CHUNK
    out = np.empty(len(a), dtype=np.float32)
    for s in range(0, len(a), chunk):
        out[s:s + chunk] = np.einsum("ij,ij->i", x[a[s:s + chunk]], x[b[s:s + chunk]])
    return out
