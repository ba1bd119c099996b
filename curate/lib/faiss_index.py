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

Vectors must be L2-normalised float32, so inner product = cosine similarity: either such an array, or
`UnitRows` over the caller's raw matrix, which normalises rows as they are read.

Memory (issue 20): at 1M x 512 every float32 copy of the vectors is 2 GiB, and a filter process already
holds one (the batch's matrix). So nothing here makes another: `UnitRows` keeps only the (n,) norms and
hands out normalised chunks of `ROW_CHUNK` rows for training, cell assignment and adding; the CPU IVF
self-join (`ivf_self_knn`) reads each cell's members from the caller's matrix instead of from a filled
faiss index (whose inverted lists would be a second full copy), and thresholds the (n, k) results
without (n * k) temporaries. What stays is O(n * k): the k-NN result heap (12 bytes per neighbour).
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
ROW_CHUNK = 65_536  # rows normalised at a time (128 MiB at d=512); a multiple of faiss's 4096-query blocks

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


class UnitRows:
    """The rows of an (n, d) matrix, L2-normalised as they are read, and `ok`: which rows have a finite,
    non-zero norm (the others read as zeros).

    Why: `filters.common.normalise` returns a normalised copy, 2 GiB at 1M x 512, next to the batch's own
    matrix; this keeps only the (n,) norms. A row read here is bit for bit `normalise`'s (same float32
    arithmetic), so results do not change. ``unit=True`` wraps vectors that are normalised already (read
    as they are). `subset` selects rows (e.g. the representatives of exact groups) without copying.
    """

    def __init__(self, x: np.ndarray, unit: bool = False, _rows: np.ndarray | None = None, _norms=None):
        self.base = x
        self.unit = unit
        self.rows = _rows
        if _norms is not None:
            self.norms, self.ok_all = _norms
        elif x.ndim != 2 or x.shape[1] == 0:
            self.norms, self.ok_all = np.ones(len(x), np.float32), np.zeros(len(x), dtype=bool)
        elif unit:
            self.norms, self.ok_all = None, np.ones(len(x), dtype=bool)
        else:
            sq = np.empty(len(x), np.float32 if x.dtype == np.float32 else np.float64)
            if x.dtype == np.float32:
                sq[:] = np.einsum("ij,ij->i", x, x)  # no (n, d) temporary; NaN for rows with a NaN
            else:  # other dtypes: converted a chunk at a time, as normalise's float32 copy would be
                for s in range(0, len(x), ROW_CHUNK):
                    c = np.asarray(x[s:s + ROW_CHUNK], dtype=np.float32)
                    sq[s:s + len(c)] = np.einsum("ij,ij->i", c, c)
                sq = sq.astype(np.float32)
            self.ok_all = np.isfinite(sq) & (sq > 0)
            self.norms = np.sqrt(np.where(self.ok_all, sq, 1.0), dtype=np.float32)

    @classmethod
    def of(cls, x) -> "UnitRows":
        """`x` as UnitRows: itself, or an array taken to be L2-normalised already."""
        return x if isinstance(x, UnitRows) else cls(np.asarray(x), unit=True)

    @property
    def d(self) -> int:
        return self.base.shape[1] if self.base.ndim == 2 else 0

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.d)

    def __len__(self) -> int:
        return len(self.base) if self.rows is None else len(self.rows)

    @property
    def ok(self) -> np.ndarray:
        return self.ok_all if self.rows is None else self.ok_all[self.rows]

    def subset(self, rows: np.ndarray) -> "UnitRows":
        """These rows (indices into this object), sharing the matrix and norms."""
        rows = np.asarray(rows, dtype=np.int64)
        base_rows = rows if self.rows is None else self.rows[rows]
        return UnitRows(self.base, self.unit, base_rows, (self.norms, self.ok_all))

    def __getitem__(self, idx) -> np.ndarray:
        """Rows `idx` (a slice or integer array) as a C-contiguous float32 (m, d) array of unit vectors."""
        if isinstance(idx, slice) and self.rows is None:
            x, norms, ok = self.base[idx], None if self.unit else self.norms[idx], self.ok_all[idx]  # views
        else:
            r = np.arange(len(self))[idx] if isinstance(idx, slice) else np.asarray(idx, dtype=np.int64)
            r = r if self.rows is None else self.rows[r]
            x, norms, ok = self.base[r], None if self.unit else self.norms[r], self.ok_all[r]
        if self.unit:
            return np.ascontiguousarray(x, dtype=np.float32)
        out = np.divide(np.asarray(x, dtype=np.float32), norms[:, None], dtype=np.float32)
        out[~ok] = 0.0
        return out

    def chunks(self, size: int | None = None):
        """(start, end, rows[start:end]) over all rows, `size` (default `ROW_CHUNK`) at a time."""
        size = size or ROW_CHUNK
        for s in range(0, len(self), size):
            e = min(len(self), s + size)
            yield s, e, self[s:e]


def train_index(x, choice: IndexChoice, seed: int = 0):
    """A trained, empty index for `choice` (IVF: k-means on a seeded sample of `x`'s rows)."""
    faiss = _faiss()
    xs = UnitRows.of(x)
    n, d = xs.shape
    if choice.kind == "flat":
        return faiss.IndexFlatIP(d)
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, choice.nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.cp.spherical = True  # centroids on the sphere, like the data
    index.cp.niter = 10  # coarse cells only need to be roughly balanced, not converged
    # Train on a seeded sample: k-means quality saturates long before all n points.
    n_train = min(n, choice.nlist * 40)
    rng = np.random.default_rng(seed)
    sample = np.arange(n) if n_train == n else np.sort(rng.choice(n, n_train, replace=False))
    index.train(xs[sample])
    index.nprobe = choice.nprobe
    return index


def add_vectors(index, x) -> None:
    """Add the rows of `x` (array or UnitRows) to `index`, `ROW_CHUNK` at a time (no full float32 copy)."""
    for _, _, block in UnitRows.of(x).chunks():
        index.add(block)


def build_index(x, choice: IndexChoice, seed: int = 0, add: bool = True):
    """Build (train) the index over `x` (n, d) float32 L2-normalised rows or `UnitRows`, and fill it
    unless add=False."""
    faiss = _faiss()
    index = train_index(x, choice, seed)
    if choice.gpu:
        index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)
    if add:
        add_vectors(index, x)
    return index


def knn(index, queries, k: int, desc: str = "searching") -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner-product search in chunks (bounded memory, progress bar). Returns (sims, ids).

    queries: an (n, d) array of unit rows, or `UnitRows`."""
    from tqdm.auto import tqdm

    qs = UnitRows.of(queries)
    n = len(qs)
    faiss = _faiss()
    if n >= BIG_BATCH_MIN and isinstance(index, faiss.IndexIVF):
        return _big_batch_knn(index, qs[:], k)
    sims = np.empty((n, k), dtype=np.float32)
    ids = np.empty((n, k), dtype=np.int64)
    with tqdm(total=n, desc=desc, unit="vec", disable=not sys.stderr.isatty(), leave=False) as bar:
        for s in range(0, n, QUERY_CHUNK):
            e = min(n, s + QUERY_CHUNK)
            sims[s:e], ids[s:e] = index.search(qs[s:e], k)
            bar.update(e - s)
    return sims, ids


def assign_cells(index, x, nprobe: int) -> np.ndarray:
    """(n, nprobe) int32: the `nprobe` nearest coarse cells of each row of `x`, nearest first."""
    xs = UnitRows.of(x)
    out = np.empty((len(xs), nprobe), dtype=np.int32)
    for s, e, block in xs.chunks():
        out[s:e] = index.quantizer.search(block, nprobe)[1]
    return out


def ivf_self_knn(x, choice: IndexChoice, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-k neighbours of every row of `x` among all rows, by IVF (CPU): (sims, ids), each (n, k).

    The same computation as filling an IndexIVFFlat with each row in its nearest cell and running
    faiss.contrib.big_batch_search over it with the rows as queries (each probing its `nprobe`
    nearest cells), which is what this did before: per cell, one BLAS product of the queries that
    probe it with its members, merged into faiss's ResultHeap. The members are read from `x` (rows in
    ascending order, as the filled index lists them) rather than from the index, so there is no
    second copy of the vectors; the result is the same, distance for distance.
    """
    from tqdm.auto import tqdm

    faiss = _faiss()
    xs = UnitRows.of(x)
    n = len(xs)
    index = train_index(xs, choice, seed)
    assign = assign_cells(index, xs, choice.nprobe)
    members = np.argsort(assign[:, 0], kind="stable")  # rows of each cell, ascending
    member_lims = np.searchsorted(assign[members, 0], np.arange(choice.nlist + 1))
    # Queries grouped by the cells they probe: faiss's in-place bucket sort, as big_batch_search does.
    assign += 1  # no -1 cells here, but the sort's bucket 0 is for them
    query_lims = faiss.matrix_bucket_sort_inplace(assign, nbucket=choice.nlist + 1, nt=16)[1:]
    query_ids = assign.ravel()
    heap = faiss.ResultHeap(n, k, keep_max=True)
    with tqdm(total=choice.nlist, desc="near duplicates", unit="cell", disable=not sys.stderr.isatty(),
              leave=False) as bar:
        for cell in range(choice.nlist):
            q = query_ids[query_lims[cell]:query_lims[cell + 1]]
            m = members[member_lims[cell]:member_lims[cell + 1]]
            if len(q) and len(m):
                sims = faiss.pairwise_distances(xs[q], xs[m], metric=faiss.METRIC_INNER_PRODUCT)
                heap.add_result_subset(q, sims, m)
            bar.update(1)
    del assign, query_ids
    heap.finalize()
    return heap.D.astype(np.float32, copy=False), heap.I.astype(np.int64, copy=False)


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
    x: "np.ndarray | UnitRows",
    threshold: float,
    index: IndexKind = "auto",
    k: int = DEFAULT_K,
    seed: int = 0,
    nprobe: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, IndexChoice]:
    """All pairs (i < j) among the rows of `x` (unit rows, or `UnitRows`) with cosine >= threshold that a
    k-NN search finds.

    Returns (i, j, sim, choice), each pair once, sorted by (i, j). With ``index="flat"`` and
    ``k`` at least the largest group size this is exact.
    """
    xs = UnitRows.of(x)
    n = len(xs)
    choice = choose_index(n, index, nprobe)
    if n < 2:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0, dtype=np.float32), choice
    k = min(k, n)
    log.info("near_pairs: n=%d index=%s k=%d threshold=%s", n, choice.describe(), k, threshold)
    if choice.kind == "ivf" and not choice.gpu and n >= BIG_BATCH_MIN:
        sims, ids = ivf_self_knn(xs, choice, k, seed)
    else:
        idx = build_index(xs, choice, seed)
        sims, ids = knn(idx, xs, k, desc="near duplicates")
        del idx
    i, j, s = threshold_pairs(sims, ids, threshold)
    return i, j, s, choice


def threshold_pairs(sims: np.ndarray, ids: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j, sim) of a self-kNN result with sim >= threshold, each once, sorted by (i, j).

    Only the entries above the threshold are expanded (a pool's few duplicates, not its n * k
    neighbours)."""
    rows, slot = np.nonzero(sims >= threshold)
    cols = ids[rows, slot]
    s = sims[rows, slot]
    ok = (cols >= 0) & (cols != rows)
    rows, cols, s = rows[ok].astype(np.int64), cols[ok], s[ok]
    i = np.minimum(rows, cols)
    j = np.maximum(rows, cols)
    # Each pair is usually found from both ends: keep one copy (the larger similarity, which
    # differs only by float rounding between the two directions).
    order = np.lexsort((-s, j, i))
    i, j, s = i[order], j[order], s[order]
    first = np.ones(len(i), dtype=bool)
    first[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])
    return i[first], j[first], s[first]


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
