"""`curate pool select-datacomp`: uids.npy of a CLIP-score recipe on a DataComp pool, in little memory.

DataComp's CLIP-score baselines keep the top fraction of a pool by a precomputed score column.
`curate filter` does that too and also writes subset.parquet and a ledger (on large DataComp pools
it streams with the pieces below: `RadixSelect`, `plan_cut`, `UidBuckets`, `read_batches`; see
curate/filter/engine.py). This stage writes only the uids, and holds
neither the score column nor the kept uids in memory, so its peak stays near the interpreter's
(numpy + pyarrow) whatever the pool size:

1. **Cut** (`RadixSelect`): the exact score at the cut is found by a radix select over the
   scores' order-preserving integer keys. Each pass streams the score column once and histograms
   the next 16 key bits of the rows still in play (65,536 counters); when the bin holding the cut
   has few enough rows they are collected and partitioned. Float32 scores take two passes of 4
   bytes a row; nothing pool-sized is allocated. A full sort (DataComp's reference) or even a
   partition needs the whole column in RAM.
2. **Collect**: (uid, score) streamed per file in two reader threads; kept uids are hex-decoded in
   one call per batch (`encode_uid_array`) and appended to 256 bucket files on disk by the top
   byte of the uid. uids are uniformly random hashes, so each bucket holds ~1/256 of the output.
3. **Write**: the .npy header (the count is known), then each bucket sorted in turn. Bucket b's
   uids all precede bucket b+1's, so the concatenation is the globally sorted array, byte for byte
   what ``np.save(np.sort(uids))`` writes, through a temporary file renamed into place.

Decisions are the same as `filters/clip_score.py` (exact top fraction with uid tie-break,
``datacomp_ties``, or a fixed threshold); tests compare the bytes with `curate filter`'s uids.npy.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from curate.core.atomic import TEMP_PREFIX, atomic_path, write_json
from curate.pool.datacomp import file_fingerprint
from curate.core.errors import CurateError

BATCH_ROWS = 16_384  # rows decoded at a time: larger batches only grow the per-thread temporaries
COLLECT_MAX = 1 << 20  # a cut bin with at most this many rows is collected and partitioned in RAM
BUCKET_BITS = 8  # kept uids spill to 2**BUCKET_BITS files by the top bits of their first 64-bit half


def encode_uid_array(arr) -> np.ndarray:
    """Arrow string array of 32-hex uids -> DataComp ``u8,u8`` records (input order), without a Python
    loop per row (curate.core.uids.encode parses each uid with int(); at millions of rows that dominates).

    The uids' bytes are contiguous in the Arrow buffer, so one ``bytes.fromhex`` call decodes them
    all into 16 big-endian bytes per uid, which numpy reads as two uint64."""
    import pyarrow as pa

    from curate.core import uids as uidmod

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    arr = arr.cast(pa.string())
    n = len(arr)
    if n == 0:
        return np.empty(0, dtype=uidmod.UID_DTYPE)
    offsets = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset: arr.offset + n + 1]
    chars = np.frombuffer(arr.buffers()[2], np.uint8)[offsets[0]: offsets[-1]]
    ok = not arr.null_count and bool((np.diff(offsets) == 32).all())
    if ok:
        ok = not ((chars >= ord("A")) & (chars <= ord("F"))).any()  # fromhex accepts upper case; uids are lower
    try:
        raw = bytes.fromhex(chars.tobytes().decode("ascii")) if ok else b""
    except (ValueError, UnicodeDecodeError):
        ok = False
    if not ok:
        bad = next(i for i, u in enumerate(arr.to_pylist()) if not uidmod.is_uid(u))
        raise CurateError(f"row {bad}: uid {arr[bad].as_py()!r} is not 32 lowercase hex characters")
    be = np.frombuffer(raw, dtype=">u8").reshape(n, 2)
    out = np.empty(n, dtype=uidmod.UID_DTYPE)
    out["f0"], out["f1"] = be[:, 0], be[:, 1]
    return out


def arrow_mask(mask: np.ndarray):
    """numpy bools -> Arrow BooleanArray, built from the packed bits. Passing the numpy array to
    Arrow's filter converts it through a path that imports pandas (+55 MB resident)."""
    import pyarrow as pa

    return pa.Array.from_buffers(pa.bool_(), len(mask), [None, pa.py_buffer(np.packbits(mask, bitorder="little"))])


_arrow_mask = arrow_mask


def sort_uids(arr: np.ndarray) -> None:
    """Sort DataComp uid records in place by (f0, f1).

    numpy's structured-array sort compares records through a generic path (6.5 s for 3.8M rows
    here); an argsort of f0, applied field by field, is ~20x faster and needs one index array and
    one field-sized temporary instead of a second copy of the records. Equal f0 (practically never
    for random 128-bit uids, but possible) are then ordered by f1 within their run."""
    order = np.argsort(arr["f0"])
    for name in ("f0", "f1"):
        arr[name] = arr[name][order]
    del order
    f0 = arr["f0"]
    dup = np.flatnonzero(f0[1:] == f0[:-1])
    if len(dup):
        starts = dup[np.r_[True, np.diff(dup) > 1]]  # first index of each run of equal f0
        for st in starts:
            end = st + 1
            while end < len(arr) and f0[end] == f0[st]:
                end += 1
            arr[st:end] = np.sort(arr[st:end], order=["f0", "f1"])


def bounded_map(fn, items, threads: int = 2, depth: int | None = None):
    """`fn` over `items` in `threads` threads, results in order, at most `depth` (default 2 x threads)
    in flight.

    Threads, not processes: Arrow's parquet decoding and numpy release the GIL, and results (score
    histograms, kept uids) need no pickling."""
    import concurrent.futures as cf
    from collections import deque

    threads = max(1, min(threads, os.cpu_count() or 1))
    depth = max(1, depth or 2 * threads)
    with cf.ThreadPoolExecutor(threads) as ex:
        pending: deque = deque()
        for item in items:
            pending.append(ex.submit(fn, item))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


_bounded_map = bounded_map


# ---------------------------------------------------------------- exact cut without the column in RAM

def order_keys(s: np.ndarray) -> np.ndarray:
    """Finite or infinite floats (no NaN) -> unsigned ints in the same order (the IEEE-754 trick:
    negative numbers get all bits flipped, others get the sign bit set). -0.0 is first made +0.0
    so that values equal as floats get equal keys."""
    uint = np.uint32 if s.dtype == np.float32 else np.uint64
    top = uint(1) << uint(8 * s.dtype.itemsize - 1)
    u = (s + s.dtype.type(0)).view(uint)
    return np.where(u & top, ~u, u | top)


@dataclass
class Cut:
    """Where the cut falls: its score and how many non-NaN scores are above / at least it."""

    value: float
    n_greater: int
    n_at_least: int


class RadixSelect:
    """Exact order statistics of a score column that is streamed, never held.

    `file_scores(f)` yields the non-NaN scores of file `f` in batches; files are read in two threads.
    The constructor makes the first pass (a histogram of the top 16 key bits, which also counts the
    rows); `select(rank)` continues from it: each further pass fixes 16 more bits of the keys that
    share the prefix so far, until the bin holding `rank` is small enough to collect and partition,
    or every bit is fixed (the bin is one value)."""

    def __init__(self, file_scores: Callable[[Path], Iterator[np.ndarray]], files: list[Path], dtype: np.dtype):
        self.file_scores, self.files, self.dtype = file_scores, files, np.dtype(dtype)
        self.bits = 8 * self.dtype.itemsize
        self.uint = np.uint32 if self.bits == 32 else np.uint64
        self.first = self._histogram(0, 0)
        self.total = int(self.first.sum())

    def _in_bin(self, s: np.ndarray, fixed: int, prefix: int) -> np.ndarray:
        k = order_keys(s)
        return k[(k >> self.uint(self.bits - fixed)) == prefix] if fixed else k

    def _histogram(self, fixed: int, prefix: int) -> np.ndarray:
        shift, uint = self.uint(self.bits - fixed - 16), self.uint

        def one_file(f: Path) -> np.ndarray:
            h = np.zeros(1 << 16, np.int64)
            for s in self.file_scores(f):
                k = self._in_bin(s, fixed, prefix)
                h += np.bincount(((k >> shift) & uint(0xFFFF)).astype(np.intp), minlength=1 << 16)
            return h

        return sum(bounded_map(one_file, self.files), np.zeros(1 << 16, np.int64))

    def select(self, rank: int) -> Cut:
        """The score at ascending `rank` (0-based) among the non-NaN scores, with the counts above it."""
        if not 0 <= rank < self.total:
            raise ValueError(f"rank {rank} outside 0..{self.total - 1}")
        n, fixed, prefix, below, hist = self.total, 0, 0, 0, self.first
        while True:
            cum = np.cumsum(hist)
            b = int(np.searchsorted(cum, rank - below, side="right"))
            below += int(cum[b - 1]) if b else 0
            fixed, prefix, count = fixed + 16, (prefix << 16) | b, int(hist[b])
            if fixed == self.bits:  # every key bit fixed: the bin is one value
                return Cut(_key_value(prefix, self.dtype), n - below - count, n - below)
            if count <= COLLECT_MAX:
                break
            hist = self._histogram(fixed, prefix)
        parts = list(bounded_map(lambda f: np.concatenate(
            [s[(order_keys(s) >> self.uint(self.bits - fixed)) == prefix] for s in self.file_scores(f)]
            or [np.empty(0, self.dtype)]), self.files))
        vals = np.concatenate(parts)
        if len(vals) != count:
            raise CurateError(f"the score column changed while it was read ({len(vals)} rows in the cut bin, "
                              f"{count} before): re-run")
        vals.partition(rank - below)
        value = vals[rank - below].item()
        return Cut(value, n - below - int((vals <= value).sum()), n - below - int((vals < value).sum()))


def _key_value(key: int, dtype: np.dtype) -> float:
    """Inverse of `order_keys` for one key."""
    uint = np.uint32 if dtype.itemsize == 4 else np.uint64
    k = np.array([key], uint)
    top = uint(1) << uint(8 * dtype.itemsize - 1)
    u = np.where(k & top, k & ~top, ~k)
    return u.view(dtype)[0].item()


# ---------------------------------------------------------------- the stage

@dataclass
class SelectConfig:
    """`select_uids` inputs: a recipe whose only step is ``clip_score`` (DataComp's CLIP-score baselines)."""

    recipe: str
    pool: str
    out: str  # uids.npy to write


def _score_recipe(recipe_path: str, pool):
    """(recipe, its clip_score step, the DataComp score column it cuts on); `pool` is a DataComp `Pool`."""
    from curate.filter.recipe import load_recipe, resolve_models

    recipe = load_recipe(recipe_path)
    steps = recipe.all_steps()
    if len(steps) != 1 or steps[0].name != "clip_score" or len(recipe.steps) != 1:
        raise CurateError(f"{recipe_path}: select-datacomp runs recipes made of one clip_score step (DataComp's "
                          f"CLIP-score baselines); this one has {[s.name for s in steps]}: use `curate filter`")
    resolve_models(recipe, pool)
    step = steps[0]
    desc = pool.descriptor
    if step.model_id not in desc["models"]:
        raise CurateError(f"{recipe_path}: model {step.model_id} is not one of DataComp's ({sorted(desc['models'])})")
    return recipe, step, desc["models"][step.model_id]["score_column"]


class UidBuckets:
    """Kept uids spilled to disk by their top bits, so the sort never needs them all in RAM."""

    def __init__(self, folder: Path):
        shutil.rmtree(folder, ignore_errors=True)  # a killed run's leftovers
        folder.mkdir(parents=True)
        self.folder = folder
        self.files = [open(folder / f"{b:03d}.u8u8", "wb") for b in range(1 << BUCKET_BITS)]
        self.count = 0
        self.lock = threading.Lock()

    def add(self, uids: np.ndarray) -> None:
        """Append uids to their buckets; safe to call from several threads."""
        if not len(uids):
            return
        b = (uids["f0"] >> np.uint64(64 - BUCKET_BITS)).astype(np.intp)
        order = np.argsort(b, kind="stable")
        ends = np.cumsum(np.bincount(b, minlength=len(self.files)))
        uids = uids[order]
        with self.lock:
            start = 0
            for fh, end in zip(self.files, ends):
                if end > start:
                    fh.write(uids[start:end].tobytes())
                start = end
            self.count += len(uids)

    def write_sorted_npy(self, fh) -> None:
        from curate.core.uids import UID_DTYPE

        for f in self.files:
            f.close()
        np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(UID_DTYPE),
                                                  "fortran_order": False, "shape": (self.count,)})
        for f in self.files:
            arr = np.fromfile(f.name, dtype=UID_DTYPE)
            sort_uids(arr)
            fh.write(arr.tobytes())

    def close(self) -> None:
        for f in self.files:
            f.close()
        shutil.rmtree(self.folder, ignore_errors=True)


_Buckets = UidBuckets


def select_uids(cfg: SelectConfig) -> dict[str, Any]:
    """Write uids.npy for a one-step clip_score recipe on a DataComp pool (see the module docstring).

    Idempotent: a matching ``<out>.json`` (recipe hash + input fingerprints) means up to date."""
    with system_allocator():  # before the recipe loads: filters/ import pyarrow
        return _select_uids(cfg)


def _select_uids(cfg: SelectConfig) -> dict[str, Any]:
    from curate.pool.pool import Pool

    source = Pool.open(cfg.pool)  # a CurateError naming what is missing when it is not a pool
    if not source.is_datacomp:
        raise CurateError(f"{cfg.pool}: not a DataComp pool (`curate pool import-datacomp`); select-datacomp reads "
                          f"DataComp's released metadata in place: use `curate filter` for this pool")
    pool, out = source.path, Path(cfg.out)
    recipe, step, col = _score_recipe(cfg.recipe, source)
    files = source.metadata_files
    key = {"recipe": recipe.hash(), "model_id": step.model_id,
           "inputs": [[f.name, file_fingerprint(f.resolve())] for f in files]}
    side = out.with_name(out.name + ".json")
    if out.exists() and side.exists():
        try:
            old = json.loads(side.read_text())
        except ValueError:
            old = {}
        if old.get("key") == key:
            click.echo(f"{out}: already up to date ({old['kept']} uids); nothing written")
            return {**old, "up_to_date": True}
    return _write_uids(pool, out, files, recipe, step, col, key, side)


@contextlib.contextmanager
def system_allocator() -> Iterator[None]:
    """Use the C library's allocator for Arrow while this stage runs.

    Arrow's default allocator (mimalloc) keeps freed pages per reader thread; on 12.8M rows this
    stage peaks at ~0.23 GB with it and ~0.13 GB with the system allocator. The choice is only
    complete when made before pyarrow loads (``ARROW_DEFAULT_MEMORY_POOL``, which the CLI run
    hits: nothing imports pyarrow before this); otherwise the default pool is switched and
    restored, which helps less (~0.17 GB) since mimalloc is then already initialised."""
    if "pyarrow" not in sys.modules:
        os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    import pyarrow as pa

    prev = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(prev)


def read_batches(f: Path, columns: list[str], batch_rows: int = BATCH_ROWS) -> Iterator:
    """Record batches of `columns` of parquet file `f`, streamed, with a CurateError naming the file.

    Single-threaded, with a small read buffer instead of whole column chunks pre-buffered: Arrow
    otherwise keeps a row group's column chunks (and an allocator arena per reader thread)
    resident, which is more than everything else a streamed stage holds."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 20)
        yield from pf.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False)
    except CurateError:
        raise
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise CurateError(f"{f}: cannot read {columns} ({e})") from None


def score_values(col) -> np.ndarray:
    """A float Arrow array as numpy (nulls -> NaN), the values buffer viewed in place: Array.to_numpy()
    would import pandas (+55 MB resident, more than a streamed stage otherwise needs)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if col.type not in (pa.float32(), pa.float64()):
        col = col.cast(pa.float64())
    if col.null_count:
        col = pc.fill_null(col, float("nan"))
    dtype = np.float32 if col.type == pa.float32() else np.float64
    return np.frombuffer(col.buffers()[1], dtype)[col.offset: col.offset + len(col)]


@dataclass
class CutPlan:
    """How a clip_score step decides, once the cut is known: keep ``s >= threshold`` (``s > threshold``
    when `strict`, plus the `tie_need` smallest uids at exactly the threshold); `n_keep` is the count
    that must come out (None for a fixed threshold, where it is not known in advance)."""

    threshold: float
    strict: bool = False
    tie_need: int = 0
    n_keep: int | None = None


def plan_cut(params, n: int, make_select: Callable[[], RadixSelect]) -> CutPlan:
    """The decision rule of `filters/clip_score.py` for `n` rows reaching the step (NaN scores
    included in `n`, never kept), with the exact cut found by a streamed radix select."""
    if params.keep_top_fraction is None:
        return CutPlan(float(params.threshold))
    sel = make_select()
    k, m = int(np.floor(n * params.keep_top_fraction + 1e-9)), sel.total
    if m == 0:
        return CutPlan(float("nan"), n_keep=0)
    if k == 0 and not params.datacomp_ties:
        return CutPlan(float("inf"), n_keep=0)
    # DataComp: sorted_desc[k], i.e. ascending rank m-1-k; curate: the k-th largest.
    cut = sel.select(m - 1 - min(k, m - 1) if params.datacomp_ties else m - min(k, m))
    if params.datacomp_ties:
        return CutPlan(cut.value, n_keep=cut.n_at_least)
    n_keep = min(k, m)
    tie_need = n_keep - cut.n_greater  # rows at exactly the cut kept, smallest uids first
    return CutPlan(cut.value, strict=tie_need < cut.n_at_least - cut.n_greater, tie_need=tie_need, n_keep=n_keep)


def _write_uids(pool: Path, out: Path, files: list[Path], recipe, step, col: str, key: dict,
                side: Path) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.time()

    def file_scores(f: Path) -> Iterator[np.ndarray]:
        for b in read_batches(f, [col]):
            s = score_values(b.column(0))
            yield s[~np.isnan(s)]  # NaN is never kept (nor counted in the pool-wide cut)

    def make_select() -> RadixSelect:
        ftype = pq.ParquetFile(files[0]).schema_arrow.field(col).type if files else pa.float64()
        return RadixSelect(file_scores, files, np.float32 if ftype == pa.float32() else np.float64)

    n = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    plan = plan_cut(step.params, n, make_select)
    thr, strict = plan.threshold, plan.strict
    buckets = UidBuckets(out.with_name(f"{TEMP_PREFIX}{out.name}.buckets"))

    def kept_in(f: Path) -> np.ndarray | None:
        # Each batch's kept uids go straight to the buckets (a lock orders the appends; a bucket's
        # order does not matter, it is sorted at the end): nothing accumulates per file.
        tie = []
        for b in read_batches(f, ["uid", col]):
            s = score_values(b.column(1))
            buckets.add(encode_uid_array(b.column(0).filter(arrow_mask(s > thr if strict else s >= thr))))
            if strict:
                tie.append(encode_uid_array(b.column(0).filter(arrow_mask(s == thr))))
        return np.concatenate(tie) if tie else None

    try:
        ties = [t for t in bounded_map(kept_in, files) if t is not None and len(t)]
        if strict:  # a top-k cut inside a run of equal scores: the smallest uids at the cut score
            tied = np.concatenate(ties)
            sort_uids(tied)
            buckets.add(tied[:plan.tie_need])
        if plan.n_keep is not None and buckets.count != plan.n_keep:
            raise CurateError(f"{pool}: expected {plan.n_keep} uids at the cut, collected {buckets.count}: the "
                              f"metadata changed while it was read; re-run")
        with atomic_path(out, suffix=".npy") as tmp, open(tmp, "wb") as fh:
            buckets.write_sorted_npy(fh)
        kept = buckets.count
    finally:
        buckets.close()
    info = {"key": key, "kept": int(kept), "threshold": thr, "recipe": recipe.name, "model_id": step.model_id,
            "score_column": col, "seconds": round(time.time() - t0, 3), "up_to_date": False}
    write_json(side, info)
    return info


@click.command("select-datacomp")
@click.option("--recipe", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A recipe whose only step is clip_score, e.g. recipes/clip_l14_30pct.yaml.")
@click.option("--pool", required=True, type=click.Path(exists=True, file_okay=False),
              help="A pool made by `curate pool import-datacomp`.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="uids.npy to write (DataComp format).")
def select_datacomp_cmd(recipe, pool, out):
    """Write the uids.npy of a CLIP-score recipe on a DataComp pool, streamed (no ledger, low memory).

    \b
    Same kept uids as `curate filter --recipe R --pool POOL` (which also writes the per-uid ledger,
    subset.parquet and report); this streams only the score column and the uids, and keeps neither
    in memory (an exact radix select for the cut, kept uids bucketed on disk for the sort), so a
    12.8M-row pool takes seconds and about 0.1 GB. Recipes with any other step: use `curate filter`.
    """
    s = select_uids(SelectConfig(recipe=recipe, pool=pool, out=out))
    if not s.get("up_to_date"):
        click.echo(f"{out}: {s['kept']} uids ({s['recipe']}, {s['score_column']} cut {s['threshold']:.6g}) "
                   f"in {s['seconds']}s")
