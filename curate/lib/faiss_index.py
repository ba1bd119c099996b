"""Near-neighbour search for deduplication, on FAISS: choose an index, find pairs above a threshold,
group them.

Why FAISS: it is the well-kept library for exact and approximate inner-product search on CPU and
GPU. What is here is only the policy around it:

* `choose_index`: exact (flat) search for small sets, where it is fast enough and has perfect
  recall; an inverted-file index (IVF) for large ones, with ``nlist`` ~ 2·sqrt(n) cells (so the
  per-query scan ``nprobe·n/nlist`` and the cell-assignment cost ``nlist`` stay balanced) and a
  fixed ``nprobe``. A GPU copy of the index is used when faiss-gpu and a GPU are present.
* `near_pairs`: self-kNN with a similarity threshold. kNN rather than range search keeps memory at
  O(n·k) whatever the data: a pool with 10,000 identical blank images would make range search
  return 10^8 pairs, while k neighbours per point still connect such a group (every member links
  to k−1 others of the same near-identical clique).
* `connected_components`: groups of duplicates, via scipy's sparse-graph routine.

Vectors must be L2-normalised float32, so inner product = cosine similarity.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

FLAT_MAX_N = 20_000  # up to here exact search takes seconds on 2 CPU cores
DEFAULT_K = 16  # neighbours per point examined for near duplicates
DEFAULT_NPROBE = 4  # measured on a 2-core machine: nlist 1024 / nprobe 4 found every planted duplicate in 200k
BIG_BATCH_MIN = 20_000  # from this many queries on a CPU IVF index, search list by list with BLAS
QUERY_CHUNK = 16_384  # queries per faiss call: bounds the (chunk, k) result arrays, drives the progress bar

IndexKind = Literal["auto", "flat", "ivf"]


def _faiss():
    import faiss  # imported lazily: `curate --help` must not pay for it

    return faiss


@dataclass(frozen=True)
class IndexChoice:
    """Which index `build_index` makes, and why (recorded in logs / manifests)."""

    kind: Literal["flat", "ivf"]
    nlist: int = 0
    nprobe: int = 0
    gpu: bool = False

    def describe(self) -> str:
        dev = "gpu" if self.gpu else "cpu"
        if self.kind == "flat":
            return f"flat (exact, {dev})"
        return f"ivf (nlist={self.nlist}, nprobe={self.nprobe}, {dev})"


def gpu_available() -> bool:
    """True when the installed faiss has GPU support and sees at least one GPU."""
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@functools.lru_cache(maxsize=1)
def _gpu_resources():
    """One StandardGpuResources per process (faiss's advice: it owns scratch memory and streams),
    kept alive here for as long as any GPU index may use it."""
    return _faiss().StandardGpuResources()


def choose_index(n: int, kind: IndexKind = "auto", nprobe: int | None = None) -> IndexChoice:
    """Pick the index for `n` vectors. ``auto``: flat up to FLAT_MAX_N, IVF above."""
    if kind not in ("auto", "flat", "ivf"):
        raise ValueError(f"index must be auto, flat or ivf, not {kind!r}")
    gpu = gpu_available()
    if kind == "flat" or (kind == "auto" and n <= FLAT_MAX_N):
        return IndexChoice("flat", gpu=gpu)
    # At least ~39 training points per cell (faiss's k-means minimum) and at least 1 cell.
    nlist = int(2 ** round(math.log2(max(1.0, 2.0 * math.sqrt(n)))))
    nlist = max(1, min(nlist, n // 39 if n >= 39 else 1, 65_536))
    probe = nprobe if nprobe is not None else DEFAULT_NPROBE
    return IndexChoice("ivf", nlist=nlist, nprobe=min(probe, nlist), gpu=gpu)


def build_index(x: np.ndarray, choice: IndexChoice, seed: int = 0, add: bool = True):
    """Build (train) the index over `x` (n, d) float32 L2-normalised rows, and fill it unless add=False."""
    faiss = _faiss()
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if choice.kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, choice.nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.cp.spherical = True  # centroids on the sphere, like the data
        index.cp.niter = 10  # coarse cells only need to be roughly balanced, not converged
        # Train on a seeded sample: k-means quality saturates long before all n points.
        n_train = min(n, choice.nlist * 40)
        rng = np.random.default_rng(seed)
        sample = x if n_train == n else x[np.sort(rng.choice(n, n_train, replace=False))]
        index.train(sample)
        index.nprobe = choice.nprobe
    if choice.gpu:
        index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)
    if add:
        index.add(x)
    return index


def knn(index, queries: np.ndarray, k: int, desc: str = "searching") -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner-product search in chunks (bounded memory, progress bar). Returns (sims, ids)."""
    from tqdm.auto import tqdm

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n = len(queries)
    faiss = _faiss()
    if n >= BIG_BATCH_MIN and isinstance(index, faiss.IndexIVF):
        return _big_batch_knn(index, queries, k)
    sims = np.empty((n, k), dtype=np.float32)
    ids = np.empty((n, k), dtype=np.int64)
    with tqdm(total=n, desc=desc, unit="vec", disable=not sys.stderr.isatty(), leave=False) as bar:
        for s in range(0, n, QUERY_CHUNK):
            e = min(n, s + QUERY_CHUNK)
            sims[s:e], ids[s:e] = index.search(queries[s:e], k)
            bar.update(e - s)
    return sims, ids


def _big_batch_knn(index, queries: np.ndarray, k: int, q_assign: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """IVF search for many queries, one inverted list at a time, distances by BLAS matrix products.

    faiss.contrib.big_batch_search does exactly this (same results as index.search, ~2x less CPU
    on a self-join of 100k x 512 here). Its progress printing ignores verbose=0, so stdout is
    swallowed.
    """
    import contextlib
    import io

    from faiss.contrib.big_batch_search import big_batch_search

    with contextlib.redirect_stdout(io.StringIO()):
        sims, ids = big_batch_search(index, queries, k, method="pairwise_distances", verbose=1, q_assign=q_assign)
    return sims.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)


def near_pairs(
    x: np.ndarray,
    threshold: float,
    index: IndexKind = "auto",
    k: int = DEFAULT_K,
    seed: int = 0,
    nprobe: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, IndexChoice]:
    """All pairs (i < j) among the rows of `x` with cosine >= threshold that a k-NN search finds.

    Returns (i, j, sim, choice), each pair once, sorted by (i, j). With ``index="flat"`` and
    ``k`` at least the largest group size this is exact.
    """
    n = len(x)
    choice = choose_index(n, index, nprobe)
    if n < 2:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0, dtype=np.float32), choice
    k = min(k, n)
    log.info("near_pairs: n=%d index=%s k=%d threshold=%s", n, choice.describe(), k, threshold)
    if choice.kind == "ivf" and not choice.gpu and n >= BIG_BATCH_MIN:
        # Self-join: the vectors are both the database and the queries, so their coarse
        # assignment (an n x nlist product) is computed once and used for adding and searching.
        from faiss.contrib.ivf_tools import add_preassigned

        x = np.ascontiguousarray(x, dtype=np.float32)
        idx = build_index(x, choice, seed, add=False)
        _, assign = idx.quantizer.search(x, choice.nprobe)
        add_preassigned(idx, x, np.ascontiguousarray(assign[:, 0], dtype=np.int64))
        sims, ids = _big_batch_knn(idx, x, k, q_assign=assign.astype(np.int32))
    else:
        idx = build_index(x, choice, seed)
        sims, ids = knn(idx, x, k, desc="near duplicates")
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    cols = ids.ravel()
    s = sims.ravel()
    ok = (cols >= 0) & (cols != rows) & (s >= threshold)
    rows, cols, s = rows[ok], cols[ok], s[ok]
    i = np.minimum(rows, cols)
    j = np.maximum(rows, cols)
    # Each pair is usually found from both ends: keep one copy (the larger similarity, which
    # differs only by float rounding between the two directions).
    order = np.lexsort((-s, j, i))
    i, j, s = i[order], j[order], s[order]
    first = np.ones(len(i), dtype=bool)
    first[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])
    return i[first], j[first], s[first], choice


def median_random_cosine(x: np.ndarray, pairs: int = 2000, seed: int = 0) -> float:
    """Median cosine of random row pairs: near 1 means collapsed embeddings (e.g. an untrained model),
    for which every similarity threshold is meaningless."""
    n = len(x)
    if n < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, n, pairs), rng.integers(0, n, pairs)
    keep = a != b
    return float(np.median(np.einsum("ij,ij->i", x[a[keep]], x[b[keep]]))) if keep.any() else float("nan")


def warn_if_collapsed(x: np.ndarray, threshold: float, what: str) -> None:
    med = median_random_cosine(x)
    if med >= threshold - 0.05:
        log.warning("%s: the median cosine between random rows is %.3f, close to the threshold %.3f: these "
                    "embeddings barely separate images (an untrained or collapsed model?), so most rows will "
                    "look like duplicates", what, med, threshold)


def connected_components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Component label per node of the undirected graph with edges (i, j) on n nodes."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as cc

    if len(i) == 0:
        return np.arange(n, dtype=np.int64)
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n)).tocsr()
    _, labels = cc(graph, directed=False)
    return labels.astype(np.int64)
