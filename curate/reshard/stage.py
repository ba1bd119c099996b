"""Reshard: copy the samples of a SUBSET out of the POOL's webdataset shards into SUBSET/shards/.

Semantics follow DataComp's resharder: the subset's `uids.npy` is memory-mapped and each pool sample
is looked up by binary search; a uid listed k > 1 times is written k times (upsampling) under the
keys `{uid}-0 .. {uid}-{k-1}`, a uid listed once under the key `{uid}`. What differs from DataComp's
script, and why:

* The lookup is done once, up front, on the pool's metadata parquet (vectorised `np.searchsorted`
  over every successful pool row) instead of inside the tar loop. That gives the exact output size
  before any image is read, so output shards are balanced by sample count (every shard holds
  `shard_size` samples but the last), and the work is split into one task per output shard that
  any worker process can run independently.
* One task writes one output shard atomically and then its `.stats.json`; the stats file is the
  completion marker, so a killed run resumes with the shards it has not finished.
* Subset uids absent from the pool are reported (`missing_uids.parquet`) and every subset row is
  accounted for in `meta.json`: written + missing + errors == rows of uids.npy.

Pool metadata and tars are read with curate.pool.io, the tars with `iter_samples(tar, keys=...)`: members
of samples that are not in the subset are passed by seeking without reading their bytes, which is most
of the cost saved when a recipe keeps a small fraction of the pool; the reader's name checks and member
cap apply (a refused sample is an error row). Member names are never used as output paths (output names
are built from validated uids).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from curate.core.version import __version__
from curate.core import uids as uidlib
from curate.core.hashing import sha256_file
from curate.core.atomic import atomic_path, cleanup_temp_files, write_parquet
from curate.core.errors import CurateError
from curate.core.stage import Marker, StageSummary
from curate.core.stage import fingerprint as stage_fingerprint
from curate.pool.io import Sample, iter_samples
from curate.pool.shard_table import write_shard_table

log = logging.getLogger(__name__)

_EXT_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
_TAR_MTIME = 0  # fixed mtime: the same inputs give byte-identical shards


@dataclass
class ReshardConfig:
    """Inputs of `reshard`. `pool` None means: read it from SUBSET/manifest.json."""

    subset: Path
    pool: Path | None = None
    shard_size: int = 10_000
    workers: int = 0  # shards written at once (processes, or Ray tasks in flight); 0: one per CPU core
    out: Path | None = None  # default SUBSET/shards
    progress: bool = True
    ray_address: str | None = None  # run the shard tasks on this Ray cluster ("local": start one here)

    def __post_init__(self) -> None:
        self.subset = Path(self.subset)
        self.pool = Path(self.pool) if self.pool is not None else None
        self.out = Path(self.out) if self.out is not None else self.subset / "shards"
        if self.shard_size < 1:
            raise CurateError(f"--shard-size {self.shard_size}: must be at least 1")


@dataclass
class _Plan:
    fingerprint: str
    n_rows: int  # rows of uids.npy (with duplicates)
    n_unique: int
    tasks: list[dict] = field(default_factory=list)
    missing: list[tuple[str, int]] = field(default_factory=list)  # (uid, copies)
    pool_duplicates: int = 0


# ---------------------------------------------------------------------------------------------
# planning


def _resolve_pool(cfg: ReshardConfig) -> Path:
    if cfg.pool is not None:
        pool = cfg.pool
    else:
        manifest = cfg.subset / "manifest.json"
        pool_s = None
        if manifest.exists():
            try:
                pool_s = json.loads(manifest.read_text()).get("pool")
            except (json.JSONDecodeError, AttributeError):
                pool_s = None
        if not isinstance(pool_s, str):
            raise CurateError(f"{cfg.subset}: no pool recorded in manifest.json; pass --pool POOL")
        pool = Path(pool_s)
        if not pool.is_absolute():
            pool = (cfg.subset / pool_s) if (cfg.subset / pool_s).exists() else pool
    from curate.pool.pool import Pool

    return Pool.open(pool).path


def _file_sig(p: Path) -> str:
    st = p.stat()
    return f"{p.name}:{st.st_size}:{st.st_mtime_ns}"


def _read_pool_metadata(pool: Path):
    """Successful pool rows (uid, shard, key) in shard/file order, via curate.pool.io."""
    import pyarrow as pa

    from curate.pool.io import list_shards, read_metadata

    files = [s.metadata for s in list_shards(pool)]
    t = read_metadata(pool, columns=["uid", "shard", "key"], success_only=True)
    try:
        t = t.cast(pa.schema([("uid", pa.string()), ("shard", pa.int64()), ("key", pa.string())]))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise CurateError(f"{pool}/metadata: columns uid, shard, key have unexpected types ({e})") from None
    return t, files


def _hex_to_struct(uids_col, source: str) -> np.ndarray:
    """Vectorised hex uid -> DataComp (u8,u8) conversion (bytes.fromhex on the joined column)."""
    import pyarrow.compute as pc

    if len(uids_col) == 0:  # a pool with no successful rows (pc.all of nothing is null, not true)
        return np.empty(0, dtype=uidlib.UID_DTYPE)
    ok = pc.fill_null(pc.match_substring_regex(uids_col, r"^[0-9a-f]{32}$"), False)  # a null uid is bad too
    if not pc.all(ok).as_py():
        i = int(np.argmin(np.asarray(ok.to_numpy(zero_copy_only=False), dtype=bool)))
        raise CurateError(f"{source}: row {i} has uid {uids_col[i].as_py()!r}, expected 32 lowercase hex characters")
    raw = np.frombuffer(bytes.fromhex("".join(uids_col.to_pylist())), dtype=">u8").reshape(-1, 2)
    out = np.empty(len(raw), dtype=uidlib.UID_DTYPE)
    out["f0"], out["f1"] = raw[:, 0], raw[:, 1]
    return out


def _shard_path(pool: Path, shard: int) -> Path:
    return pool / "shards" / f"{int(shard):08d}.tar"


def _augmented_texts(subset: Path) -> dict[str, str]:
    """uid -> text_augmented from SUBSET/subset.parquet, when the recipe produced that column."""
    import pyarrow.parquet as pq

    p = subset / "subset.parquet"
    if not p.exists():
        return {}
    names = pq.read_schema(p).names
    if "text_augmented" not in names:
        return {}
    t = pq.read_table(p, columns=["uid", "text_augmented"])
    out: dict[str, str] = {}
    for u, txt in zip(t["uid"].to_pylist(), t["text_augmented"].to_pylist()):
        if txt is not None and u not in out:
            out[u] = txt
    return out


def make_plan(cfg: ReshardConfig, pool: Path) -> _Plan:
    uids_path = cfg.subset / "uids.npy"
    subset_arr = uidlib.load(uids_path, mmap=True)  # DataComp: memory-mapped, sorted
    meta, meta_files = _read_pool_metadata(pool)
    pool_arr = _hex_to_struct(meta["uid"], f"{pool}/metadata")

    # binary search of every pool sample in the sorted subset list; multiplicity = right - left
    left = np.searchsorted(subset_arr, pool_arr, side="left")
    right = np.searchsorted(subset_arr, pool_arr, side="right")
    copies = right - left
    hit = np.flatnonzero(copies > 0)
    # a uid present twice in the pool is taken once (first occurrence), so counts reconcile
    first_of_run = np.ones(len(hit), dtype=bool)
    if len(hit):
        _, first_idx = np.unique(left[hit], return_index=True)
        first_of_run[:] = False
        first_of_run[first_idx] = True
    pool_duplicates = int((~first_of_run).sum())
    hit = np.sort(hit[first_of_run])

    # subset uids never matched -> missing
    found = np.zeros(len(subset_arr), dtype=bool)
    for lo, hi in zip(left[hit], right[hit]):
        found[lo:hi] = True
    missing_idx = np.flatnonzero(~found)
    missing: list[tuple[str, int]] = []
    if len(missing_idx):
        miss_arr = np.asarray(subset_arr[missing_idx])
        uniq, counts = np.unique(miss_arr, return_counts=True)
        missing = list(zip(uidlib.decode(uniq), (int(c) for c in counts)))

    aug = _augmented_texts(cfg.subset)
    shard_col = meta["shard"].to_pylist()
    key_col = meta["key"].to_pylist()
    uid_col = meta["uid"].to_pylist()

    # expand copies into output items, in pool order, then cut into shards of shard_size
    items: list[tuple[str, str, str, str | None]] = []  # (pool shard, pool key, out key, uid)
    for i in hit:
        u = uid_col[i]
        k = int(copies[i])
        outs = [u] if k == 1 else [f"{u}-{j}" for j in range(k)]
        for ok in outs:
            items.append((shard_col[i], key_col[i], ok, u))

    fingerprint = stage_fingerprint(
        sha256_file(uids_path),
        *([sha256_file(cfg.subset / "subset.parquet")] if (cfg.subset / "subset.parquet").exists() else []),
        *(_file_sig(f) for f in meta_files),
        f"shard_size={cfg.shard_size};v={__version__}")

    tasks = []
    for start in range(0, len(items), cfg.shard_size):
        chunk = items[start:start + cfg.shard_size]
        sources: dict[str, dict[str, list[list]]] = {}
        for pshard, pkey, okey, u in chunk:
            path = str(_shard_path(pool, pshard))
            sources.setdefault(path, {}).setdefault(pkey, []).append([okey, u, aug.get(u)])
        tasks.append({"index": len(tasks), "sources": sources, "n_expected": len(chunk)})
    return _Plan(fingerprint, len(subset_arr), int(len(np.unique(np.asarray(subset_arr)))) if len(subset_arr) else 0,
                 tasks, missing, pool_duplicates)


# ---------------------------------------------------------------------------------------------
# one output shard (runs in a worker process)


def _add(tw: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = _TAR_MTIME
    ti.mode = 0o444
    tw.addfile(ti, io.BytesIO(data))


def _emit(tw, sample: Sample, wanted: list[list], errors: list, where: dict) -> int:
    """Write one pool sample under each of its planned output keys; return samples written."""
    uid = wanted[0][1]
    meta = sample.meta
    if meta.get("uid", uid) != uid:
        errors.append({**where, "reason": f"json uid {meta.get('uid')!r} differs from metadata uid {uid}"})
        return 0
    if sample.image is None:
        errors.append({**where, "reason": "no image member"})
        return 0
    members = {ext: data for ext, data in sample.members.items() if _EXT_RE.match(ext)}
    n = 0
    for out_key, u, text_aug in wanted:
        m = dict(meta, uid=u, key=out_key, pool_key=where["key"], pool_shard=Path(where["shard"]).name)
        for ext, data in members.items():
            if ext in ("json", "txt"):
                continue
            _add(tw, f"{out_key}.{ext}", data)
        if text_aug is not None:
            m["text_original"] = members.get("txt", b"").decode("utf-8", "replace")
            txt = text_aug.encode("utf-8")
        else:
            txt = members.get("txt", b"")
        _add(tw, f"{out_key}.txt", txt)
        _add(tw, f"{out_key}.json", json.dumps(m, sort_keys=True).encode("utf-8"))
        n += 1
    return n


def _read_wanted(tar_path: str, wanted: dict[str, list[list]], tw, errors: list) -> tuple[int, set]:
    """Copy the wanted samples of one pool tar through the pool's reader, which seeks past the others."""
    written, seen = 0, set()
    tar_errors: list[str] = []
    for s in iter_samples(tar_path, tar_errors, keys=wanted):
        if s.key in seen:
            continue  # a key listed twice in a tar: its first sample is the one the metadata row means
        seen.add(s.key)
        where = {"shard": tar_path, "key": s.key, "uid": wanted[s.key][0][1], "copies": len(wanted[s.key])}
        if s.error:
            errors.append({**where, "reason": s.error})
            continue
        written += _emit(tw, s, wanted[s.key], errors, where)
    for e in tar_errors:  # a damaged tar: every wanted sample not read from it is an error row
        reason = f"truncated or corrupt shard: {e}" if seen else f"cannot read shard: {e}"
        for key in sorted(set(wanted) - seen):
            errors.append({"shard": tar_path, "key": key, "uid": wanted[key][0][1], "copies": len(wanted[key]),
                           "reason": reason})
    return written, seen


def run_task(task: dict, out_dir: str, fingerprint: str) -> dict:
    """Write output shard `task['index']` and its stats file; return the stats."""
    t0 = time.perf_counter()
    name = f"{task['index']:08d}.tar"
    errors: list[dict] = []
    written = 0
    sources_count = {}
    with atomic_path(Path(out_dir) / name, suffix=".tar") as tmp:
        with tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tw:
            for tar_path, wanted in task["sources"].items():
                n, seen = _read_wanted(tar_path, wanted, tw, errors)
                written += n
                sources_count[Path(tar_path).name] = n
                for key in sorted(set(wanted) - seen):
                    if not any(e.get("key") == key and e["shard"] == tar_path for e in errors):
                        errors.append({"shard": tar_path, "key": key, "uid": wanted[key][0][1],
                                       "copies": len(wanted[key]), "reason": "listed in metadata, absent from shard"})
    stats = {
        "shard": name,
        "fingerprint": fingerprint,
        "n_expected": task["n_expected"],
        "n_samples": written,
        "n_error_rows": sum(e["copies"] for e in errors),
        "bytes": (Path(out_dir) / name).stat().st_size,
        "sources": sources_count,
        "errors": errors,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    Marker(Path(out_dir) / f"{task['index']:08d}.stats.json").write(stats)  # the shard's completion marker
    return stats


# ---------------------------------------------------------------------------------------------
# stage function


def _done_stats(out: Path, index: int, fingerprint: str) -> dict | None:
    """The stats of output shard `index` when it is done for these inputs (its stats file is the marker)."""
    if not (out / f"{index:08d}.tar").exists():
        return None
    return Marker(out / f"{index:08d}.stats.json").matching(fingerprint)


def reshard(cfg: ReshardConfig) -> dict:
    """Write SUBSET/shards/*.tar from POOL for the uids of SUBSET/uids.npy; return the summary (meta.json)."""
    from tqdm import tqdm

    pool = _resolve_pool(cfg)
    out = cfg.out
    if cfg.ray_address:  # a Ray worker's working folder is not ours: its tasks get absolute paths
        pool, out = pool.resolve(), out.resolve()
    plan = make_plan(cfg, pool)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    old = Marker(meta_path).matching(plan.fingerprint)
    if old is not None and all((out / s["name"]).exists() for s in old.get("shards", [])):
        log.info("reshard: %s already up to date", out)
        return StageSummary("reshard", True, old.get("seconds", 0.0), fields=old).as_dict()
    cleanup_temp_files(out)
    # drop shards of an older plan (different inputs or shard size) so no stale file remains
    keep = {f"{t['index']:08d}" for t in plan.tasks}
    for p in list(out.glob("*.tar")) + list(out.glob("*.stats.json")):
        if p.name.split(".")[0] not in keep or _done_stats(out, int(p.name.split(".")[0]), plan.fingerprint) is None:
            if p.name.split(".")[0].isdigit():
                p.unlink()
    meta_path.unlink(missing_ok=True)

    results: dict[int, dict] = {}
    todo = []
    for t in plan.tasks:
        st = _done_stats(out, t["index"], plan.fingerprint)
        if st is not None:
            results[t["index"]] = st
        else:
            todo.append(t)
    resumed = len(results)
    from curate.core.parallel import Backend, pmap

    if cfg.ray_address:
        backend = Backend.choose(cfg.workers, cfg.ray_address)
    else:
        workers = cfg.workers or (os.cpu_count() or 1)
        backend = Backend.choose(max(1, min(workers, len(todo))) if todo else 1)
    bar = tqdm(total=len(plan.tasks), initial=resumed, unit="shard", desc="reshard",
               disable=not cfg.progress or None)
    t0 = time.perf_counter()
    # one task per output shard, in any order: each writes its own files (the stats file last)
    for t, st in pmap(run_task, todo, backend=backend, args=(str(out), plan.fingerprint), ordered=False,
                      label=lambda t: f"reshard of output shard {t['index']}"):
        results[t["index"]] = st
        bar.update()
    bar.close()
    seconds = time.perf_counter() - t0

    if plan.missing:
        import pyarrow as pa

        write_parquet(out / "missing_uids.parquet",
                      pa.table({"uid": [u for u, _ in plan.missing], "copies": [c for _, c in plan.missing]}))
    else:
        (out / "missing_uids.parquet").unlink(missing_ok=True)
    shards = [{"name": f"{i:08d}.tar", "n_samples": results[i]["n_samples"]} for i in sorted(results)]
    n_written = sum(s["n_samples"] for s in shards)
    n_missing_rows = sum(c for _, c in plan.missing)
    n_error_rows = sum(results[i]["n_error_rows"] for i in results)
    summary = {
        "fingerprint": plan.fingerprint,
        "version": __version__,
        "subset": str(cfg.subset),
        "pool": str(pool),
        "shard_size": cfg.shard_size,
        "n_subset_rows": plan.n_rows,
        "n_subset_unique": plan.n_unique,
        "n_written": n_written,
        "n_missing_unique": len(plan.missing),
        "n_missing_rows": n_missing_rows,
        "n_error_rows": n_error_rows,
        "pool_duplicate_rows_ignored": plan.pool_duplicates,
        "reconciles": n_written + n_missing_rows + n_error_rows == plan.n_rows,
        "n_shards": len(shards),
        "shards_resumed": resumed,
        "seconds": round(seconds, 3),
        "samples_per_s": round(n_written / seconds, 1) if seconds > 0 and todo else None,
        "shards": shards,
    }
    # the shard table open_clip_train and DataComp's resharder read for the dataset size, as the pool's is written
    write_shard_table(out, {s["name"]: s["n_samples"] for s in shards})
    Marker(meta_path).write(summary)  # meta.json, written last: the whole stage's completion marker
    return StageSummary("reshard", False, seconds, fields=summary).as_dict()


@click.command("reshard")
@click.option("--subset", "subset", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="SUBSET folder holding uids.npy (DataComp format) and optionally subset.parquet.")
@click.option("--pool", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="POOL folder (shards/ + metadata/). Default: the pool named in SUBSET/manifest.json.")
@click.option("--shard-size", default=10_000, show_default=True, help="Samples per output shard (the last is smaller).")
@click.option("--workers", default=0, show_default=True,
              help="Output shards written at once: worker processes, or Ray tasks in flight with --ray-address "
                   "(0 = one per CPU core here, the cluster's CPUs on Ray).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder. Default: SUBSET/shards.")
@click.option("--ray-address", default=None,
              help="Write the shards with Ray tasks on this cluster (e.g. 'auto', 'HOST:PORT'; 'local' starts one "
                   "here). The pool and SUBSET folders must be readable at the same paths on every node.")
def reshard_cmd(subset: Path, pool: Path | None, shard_size: int, workers: int, out: Path | None,
                ray_address: str | None) -> None:
    """Copy the subset's samples from the pool into balanced webdataset shards.

    Duplicated uids in uids.npy are upsampled (keys {uid}-0, {uid}-1, ...). The caption is
    subset.parquet's text_augmented when present. Subset uids that the pool lacks are listed in
    shards/missing_uids.parquet; shards/meta.json reconciles every uids.npy row. Re-running with the
    same inputs does nothing; a killed run resumes with the shards it had not finished.
    """
    s = reshard(ReshardConfig(subset=subset, pool=pool, shard_size=shard_size, workers=workers, out=out,
                              ray_address=ray_address))
    if s.get("up_to_date"):
        click.echo(f"reshard: {s['n_written']} samples in {s['n_shards']} shards already up to date, nothing to do")
        return
    click.echo(
        f"reshard: wrote {s['n_written']} samples in {s['n_shards']} shards "
        f"({s['shards_resumed']} resumed) to {out or subset / 'shards'}; "
        f"{s['n_missing_unique']} subset uids ({s['n_missing_rows']} rows) not in the pool, "
        f"{s['n_error_rows']} rows unreadable"
    )
    if not s["reconciles"]:
        raise CurateError("reshard: counts do not reconcile; see meta.json")
