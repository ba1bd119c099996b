"""Submission bundles: what a RUN produced, packed so that anyone can check it (`curate submit` / `curate verify`).

DataComp's leaderboard trusted whatever was sent (declared sizes were wrong on it). A bundle here carries
everything needed to re-check a claim against the pool:

    BUNDLE/
      bundle.json      name, scale, seed, declared subset size, declared tasks, average, sha256 of every file
      results.jsonl    one line per task, DataComp's eval_results format {"key","dataset","main_metric","metrics","n"}
      uids.npy         the subset's uids (DataComp format) and uids.npy.sha256 (``sha256sum`` format)
      recipe.yaml      the recipe the subset was filtered with (when known)
      manifest.json    the filter manifest (recipe hash, input hashes, counts per step)
      info.json        the training run's info.json (scale, hyperparameters, seed, versions, official flag)
      versions.json    tool versions at submission time
      results.items/   the run's per-item results, one zstd parquet per task (RUN/eval_results.items/, byte
                       for byte; hashed and listed in bundle.json like every other file)

`curate submit RUN` writes the directory and a deterministic ``.tar.gz`` of it; `curate verify BUNDLE --pool POOL`
re-derives every claim (uid membership in the pool, size, hashes, official hyperparameters, task coverage, every
score recomputed from the per-item results) and names the first reason a tampered bundle fails.

What the item check proves: the claimed scores are what the bundle's own per-item predictions give, so a bundle
is consistent with itself (an edited score, or an edited prediction, is caught even after re-hashing). It cannot
prove the predictions came from the model: whoever fabricates predictions and scores together and re-hashes
passes. Only re-running the evaluation on the checkpoint can check that.

bundle.json also carries `pool_completeness` (curate.pool.completeness: the share of the pool's input rows
that downloaded, read from the pool.json of the pool the subset was filtered from, at submit time) and the
recipe's hash, so the leaderboard can group seeds by recipe and `curate compare` can warn about unequal pools.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import platform
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import click
import numpy as np

from curate.core import atomic, uids as uidlib
from curate.core.hashing import sha256_file
from benchmark.provenance import pool_completeness_of_subset, subset_dir_of
from benchmark.results import average_score, first, main_value, read_json, read_results
from curate.core.errors import CurateError

BUNDLE_FORMAT = 1
BUNDLE_FILES_REQUIRED = ("results.jsonl", "uids.npy", "uids.npy.sha256", "info.json", "versions.json")
ITEMS_DIR = "results.items"  # per-item files beside results.jsonl, where benchmark.evaluate.read_items looks
# caps for safe extraction of untrusted tarballs: a bundle is a few files of metadata, one uid array and one
# per-item file per task (DataComp's 40 + the offline suites' 13)
MAX_MEMBERS = 256
SCORE_TOL = 1e-9  # recomputed vs claimed metric (the same arithmetic gives equal floats; JSON keeps them exact)
MAX_TOTAL_BYTES = 4 << 30
TOOL_PACKAGES = ("curate", "torch", "torchvision", "open_clip_torch", "img2dataset", "webdataset", "numpy",
                 "pyarrow", "duckdb", "faiss-cpu", "ray")


# ----------------------------------------------------------------------------------------------- small helpers

def tool_versions() -> dict[str, str]:
    """Installed versions of the tools a result depends on (read from package metadata: no heavy imports)."""
    out = {"python": platform.python_version()}
    for pkg in TOOL_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def official_hyperparameters(scale: str) -> dict | None:
    """The fixed hyperparameters of `scale` from benchmark/scales.py (None when that module is unavailable)."""
    try:
        from benchmark import scales
    except ImportError:
        return None
    obj = None
    getter = getattr(scales, "get_scale", None)
    if callable(getter):
        try:
            obj = getter(scale)
        except (KeyError, ValueError, CurateError):
            obj = None
    if obj is None:
        table = getattr(scales, "SCALES", None)
        if isinstance(table, dict):
            obj = table.get(scale)
    if obj is None:
        return {}
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return dict(obj)
    return dict(vars(obj))


def run_hyperparameters(info: dict) -> dict | None:
    # benchmark/train.py records the scale's values under info["run"]["scale"] (they feed the run fingerprint)
    run = info.get("run")
    if isinstance(run, dict) and isinstance(run.get("scale"), dict):
        return run["scale"]
    hp = first(info, "hyperparameters", "hparams", "scale_config", "config")
    return hp if isinstance(hp, dict) else None


# ----------------------------------------------------------------------------------------------- submit

@dataclass
class SubmitConfig:
    """`curate submit`: pack RUN (and the SUBSET it trained on) into a verifiable bundle."""

    run: Path
    name: str | None = None  # default: the recipe name, else the run folder name
    out: Path | None = None  # bundle directory; default RUN/submission
    subset: Path | None = None  # override when info.json's subset path moved
    tarball: bool = True
    leaderboard_db: Path | None = None  # also record in this leaderboard (None: do not)


def _recipe_text(subset: Path, manifest: dict) -> str | None:
    for cand in (subset / "recipe.yaml", subset / "recipe.yml"):
        if cand.is_file():
            return cand.read_text(encoding="utf-8")
    rec = manifest.get("recipe")
    if isinstance(rec, str) and os.path.isfile(rec):
        return Path(rec).read_text(encoding="utf-8")
    for key in ("recipe_text", "recipe_yaml"):
        if isinstance(manifest.get(key), str):
            return manifest[key]
    if isinstance(rec, dict):
        import yaml

        return yaml.safe_dump(rec, sort_keys=False)
    return None


def _recipe_name(manifest: dict, recipe_text: str | None) -> str | None:
    rec = manifest.get("recipe")
    if isinstance(rec, dict) and isinstance(rec.get("name"), str):
        return rec["name"]
    for key in ("recipe_name", "name"):
        if isinstance(manifest.get(key), str):
            return manifest[key]
    if recipe_text:
        import yaml

        try:
            obj = yaml.safe_load(recipe_text)
        except yaml.YAMLError:
            return None
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            return obj["name"]
    return None


def run_items(run: Path, results: list[dict]) -> tuple[dict[str, bytes], list[str]]:
    """({bundle path: bytes} of the RUN's per-item files of the same model, scored registered tasks without one)."""
    from benchmark.evaluate import items_meta, items_path
    from benchmark.tasks import TASKS

    rfile = run / "eval_results.jsonl"
    files, missing = {}, []
    for r in results:
        if r["key"] not in TASKS or main_value(r) is None:
            continue
        path = items_path(rfile, r["key"])
        try:
            meta = items_meta(path)
        except CurateError:
            meta = None
        if meta is None or (r.get("model_id") is not None and meta.get("model_id") != r.get("model_id")):
            missing.append(r["key"])
            continue
        files[f"{ITEMS_DIR}/{path.name}"] = path.read_bytes()
    return files, sorted(missing)


def _safe_name(name: str) -> str:
    clean = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".")
    if not clean:
        raise CurateError(f"--name {name!r}: needs at least one letter or digit")
    return clean


def _write_tarball(bundle: Path, dest: Path) -> None:
    """A reproducible tar.gz: sorted members, fixed mtimes and owners, so equal bundles give equal bytes."""
    import gzip

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for p in sorted(bundle.rglob("*"), key=lambda q: q.relative_to(bundle).as_posix()):
            if not p.is_file() or p.name.startswith(atomic.TEMP_PREFIX):
                continue
            ti = tarfile.TarInfo(f"{bundle.name}/{p.relative_to(bundle).as_posix()}")
            ti.size = p.stat().st_size
            ti.mtime = 0
            ti.mode = 0o644
            with open(p, "rb") as fh:
                tar.addfile(ti, fh)
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0) as g:
        g.write(buf.getvalue())
    atomic.write_bytes(dest, gz.getvalue())


def submit(cfg: SubmitConfig) -> dict:
    """Build BUNDLE from a finished RUN; returns the bundle summary (bundle.json content plus paths).

    Idempotent: when an existing bundle already holds the same files, nothing is rewritten.
    """
    from curate.core.stage import StageSummary

    t_start = time.perf_counter()
    run = Path(cfg.run)
    if not run.is_dir():
        raise CurateError(f"{run}: run directory not found")
    info = read_json(run / "info.json", "training info written by `curate train`")
    results = read_results(run / "eval_results.jsonl")
    if not results:
        raise CurateError(f"{run / 'eval_results.jsonl'}: no task results")
    subset = Path(cfg.subset) if cfg.subset else subset_dir_of(run, info)
    if subset is None:
        raise CurateError(f"{run / 'info.json'}: does not say which subset was trained on; pass --subset SUBSET")
    if not (subset / "uids.npy").is_file():
        raise CurateError(f"{subset / 'uids.npy'}: missing (the subset the run trained on); pass --subset SUBSET")
    arr = uidlib.load(subset / "uids.npy")
    manifest = read_json(subset / "manifest.json", "filter manifest") if (subset / "manifest.json").is_file() else {}
    recipe_text = _recipe_text(subset, manifest)
    recipe_name = _recipe_name(manifest, recipe_text)
    name = _safe_name(cfg.name or recipe_name or run.name)
    seed = first(info, "seed")
    scale = first(info, "scale", "scale_name")
    if isinstance(scale, dict):
        scale = scale.get("name")
    if scale is None:
        raise CurateError(f"{run / 'info.json'}: no 'scale' field")
    out = Path(cfg.out) if cfg.out else run / "submission"
    out.mkdir(parents=True, exist_ok=True)
    # a killed submit's temp files: bundle.json (written last) marks a finished bundle, and every
    # file is rewritten unless all hashes match, so a partial bundle is always redone
    atomic.cleanup_temp_files(out)
    atomic.cleanup_temp_siblings(out.with_name(out.name + ".tar.gz"))

    files: dict[str, bytes] = {}
    files["results.jsonl"] = "".join(json.dumps(r, sort_keys=True) + "\n" for r in results).encode()
    files["uids.npy"] = (subset / "uids.npy").read_bytes()
    uids_sha = hashlib.sha256(files["uids.npy"]).hexdigest()
    files["uids.npy.sha256"] = f"{uids_sha}  uids.npy\n".encode()
    files["info.json"] = (run / "info.json").read_bytes()
    if manifest:
        files["manifest.json"] = (subset / "manifest.json").read_bytes()
    if recipe_text is not None:
        files["recipe.yaml"] = recipe_text.encode()
    old_versions = out / "versions.json"
    versions = tool_versions()
    # keep the versions file of an existing bundle so that a re-submit with identical content is a no-op
    if old_versions.is_file():
        try:
            prev = json.loads(old_versions.read_text())
        except json.JSONDecodeError:
            prev = None
        if isinstance(prev, dict):
            versions = prev
    files["versions.json"] = (json.dumps(versions, indent=2, sort_keys=True) + "\n").encode()
    item_files, no_items = run_items(run, results)
    files.update(item_files)

    avg, missing = average_score(results)
    declared = {
        "format": BUNDLE_FORMAT,
        "name": name,
        "recipe": recipe_name,
        "scale": scale,
        "seed": seed,
        "arch": first(info, "model", "arch"),
        "official": bool(info.get("official", False)),
        "subset_size": int(len(arr)),
        "unique_uids": int(len(np.unique(arr))),
        "uids_sha256": uids_sha,
        "tasks": sorted(r["key"] for r in results),
        "tasks_missing": missing,
        "average": avg,
        "recipe_hash": first(manifest, "recipe_hash", "recipe_sha256"),
        "pool_completeness": pool_completeness_of_subset(subset),
        "items": {"dir": ITEMS_DIR, "tasks": sorted(f.split("/", 1)[1][:-len(".parquet")].replace("--", "/")
                                                    for f in item_files),
                  "without_items": no_items},
        "files": {k: hashlib.sha256(v).hexdigest() for k, v in sorted(files.items())},
    }
    prev_bundle = out / "bundle.json"
    unchanged = False
    if prev_bundle.is_file():
        try:
            prev = json.loads(prev_bundle.read_text())
        except json.JSONDecodeError:
            prev = {}
        same = {k: v for k, v in prev.items() if k != "created_at"} == declared
        unchanged = same and all((out / f).is_file() and sha256_file(out / f) == h for f, h in declared["files"].items())
        if unchanged:
            declared["created_at"] = prev.get("created_at")
    if not unchanged:
        for fname, data in files.items():
            atomic.write_bytes(out / fname, data)
        for stale in ("recipe.yaml", "manifest.json"):
            if stale not in files and (out / stale).exists():
                (out / stale).unlink()
        if (out / ITEMS_DIR).is_dir():
            for p in (out / ITEMS_DIR).iterdir():
                if f"{ITEMS_DIR}/{p.name}" not in files and p.is_file():
                    p.unlink()
        declared["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        atomic.write_json(out / "bundle.json", declared)
    tar_path = out.with_name(out.name + ".tar.gz")
    if cfg.tarball and (not unchanged or not tar_path.is_file()):
        _write_tarball(out, tar_path)
    summary = dict(declared, bundle=str(out), tarball=str(tar_path) if cfg.tarball else None, unchanged=unchanged)
    if cfg.leaderboard_db is not None:
        from benchmark.leaderboard import add_bundle

        add_bundle(Path(cfg.leaderboard_db), out)
    # the stage contract (curate.core.stage): `unchanged` is kept for its readers; up to date means the same
    return StageSummary("submit", unchanged, time.perf_counter() - t_start, fields=summary).as_dict()


# ----------------------------------------------------------------------------------------------- verify

@dataclass
class VerifyConfig:
    """`curate verify`: re-check every claim of a bundle against a pool."""

    bundle: Path  # bundle directory or .tar.gz
    pool: Path  # POOL directory (metadata/*.parquet) or a DataComp uids.npy of the pool
    require_success: bool = False  # also require each uid to have downloaded successfully in this pool


@dataclass
class VerifyReport:
    ok: bool
    checks: list[tuple[str, bool, str]] = field(default_factory=list)  # (check, passed, detail)
    bundle: dict = field(default_factory=dict)

    def add(self, check: str, passed: bool, detail: str = "") -> bool:
        self.checks.append((check, passed, detail))
        if not passed:
            self.ok = False
        return passed

    @property
    def reasons(self) -> list[str]:
        return [f"{c}: {d}" for c, p, d in self.checks if not p]


def _is_within(base: Path, target: Path) -> bool:
    try:
        target.resolve().relative_to(base.resolve())
        return True
    except ValueError:
        return False


def safe_extract(tar_path: Path, dest: Path) -> Path:
    """Extract an untrusted bundle tarball into `dest` and return the bundle directory inside it.

    Refuses (CurateError naming the member) absolute paths, ``..`` components, links, devices, more than
    MAX_MEMBERS members or more than MAX_TOTAL_BYTES; and extracts with tarfile's ``data`` filter as a
    second line of defence.
    """
    try:
        tar = tarfile.open(tar_path, mode="r:*")
    except (tarfile.TarError, OSError) as e:
        raise CurateError(f"{tar_path}: not a readable tar archive ({e})") from None
    with tar:
        members = []
        total = 0
        for m in tar:
            if len(members) >= MAX_MEMBERS:
                raise CurateError(f"{tar_path}: more than {MAX_MEMBERS} members; not a curate bundle")
            name = m.name
            parts = Path(name).parts
            if name.startswith(("/", "\\")) or Path(name).is_absolute() or ".." in parts or ":" in name:
                raise CurateError(f"{tar_path}: member {name!r} has an unsafe path (absolute or '..'); refusing to extract")
            if not (m.isfile() or m.isdir()):
                raise CurateError(f"{tar_path}: member {name!r} is a link or special file; refusing to extract")
            total += m.size
            if total > MAX_TOTAL_BYTES:
                raise CurateError(f"{tar_path}: members exceed {MAX_TOTAL_BYTES >> 20} MiB; refusing to extract")
            if not _is_within(dest, dest / name):
                raise CurateError(f"{tar_path}: member {name!r} escapes the extraction folder")
            members.append(m)
        tar.extractall(dest, members=members, filter="data")
    tops = {Path(m.name).parts[0] for m in members if Path(m.name).parts}
    if len(tops) == 1 and (dest / next(iter(tops))).is_dir():
        return dest / next(iter(tops))
    return dest


def pool_uid_table(pool: Path):
    """SQL relation text for the pool's uids (and status when known) for DuckDB."""
    pool = Path(pool)
    if pool.is_file() and pool.suffix == ".npy":
        return None
    meta = pool / "metadata"
    if not meta.is_dir() or not any(meta.glob("*.parquet")):
        raise CurateError(f"{pool}: not a pool (no metadata/*.parquet); pass the POOL directory `curate download` wrote")
    return str(meta / "*.parquet")


def _check_uids_in_pool(rep: VerifyReport, arr: np.ndarray, pool: Path, require_success: bool) -> None:
    import duckdb
    import pyarrow as pa

    hexes = uidlib.decode(np.unique(arr))
    sub = pa.table({"uid": pa.array(hexes, pa.string())})
    con = duckdb.connect()
    con.register("sub", sub)
    glob = pool_uid_table(pool)
    if glob is None:
        pool_arr = uidlib.load(pool)
        con.register("pool_uids", pa.table({"uid": pa.array(uidlib.decode(np.unique(pool_arr)), pa.string())}))
        src = "pool_uids"
        has_status = False
    else:
        src = f"read_parquet('{glob.replace(chr(39), chr(39) * 2)}', union_by_name=true)"
        cols = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()}
        has_status = "status" in cols
    missing = con.sql(f"SELECT uid FROM sub ANTI JOIN (SELECT DISTINCT uid FROM {src}) p USING (uid) ORDER BY uid").fetchall()
    if missing:
        ex = ", ".join(m[0] for m in missing[:3])
        rep.add("uids in pool", False, f"{len(missing)} of {len(hexes)} distinct uids are not in the pool {pool} (e.g. {ex})")
    else:
        rep.add("uids in pool", True, f"all {len(hexes)} distinct uids found in {pool}")
    if has_status:
        failed = con.execute(
            f"SELECT count(*) FROM sub SEMI JOIN (SELECT uid FROM {src} GROUP BY uid HAVING bool_and(status <> 'success')) p "
            "USING (uid)"
        ).fetchone()[0]
        if failed:
            detail = f"{failed} uids did not download successfully in this pool (they cannot have been trained on here)"
            if require_success:
                rep.add("uids downloaded", False, detail)
            else:
                rep.checks.append(("uids downloaded", True, "warning: " + detail))
    con.close()


def _check_hparams(rep: VerifyReport, info: dict, scale: str) -> None:
    if not info.get("official", False):
        rep.add("official hyperparameters", False, "info.json marks the run unofficial (trained with --unofficial)")
        return
    official = official_hyperparameters(scale)
    if official is None:
        rep.checks.append(("official hyperparameters", True, "warning: benchmark/scales.py unavailable; official flag only"))
        return
    if not official:
        rep.add("official hyperparameters", False, f"scale {scale!r} is not defined in benchmark/scales.py")
        return
    used = run_hyperparameters(info)
    if used is None:
        rep.add("official hyperparameters", False, "info.json records no hyperparameters to compare")
        return
    diffs = []
    for k, v in official.items():
        if k in ("name", "description", "doc"):
            continue
        if k not in used:
            continue
        u = used[k]
        if isinstance(v, (list, tuple)) and isinstance(u, (list, tuple)):
            same = len(v) == len(u) and all(_num_eq(a, b) for a, b in zip(v, u))
        else:
            same = _num_eq(v, u)
        if not same:
            diffs.append(f"{k}={u!r} (official {v!r})")
    compared = [k for k in official if k in used]
    if diffs:
        rep.add("official hyperparameters", False, "differs from benchmark/scales.py: " + "; ".join(diffs))
    elif not compared:
        rep.add("official hyperparameters", False, "none of the scale's hyperparameters are recorded in info.json")
    else:
        rep.add("official hyperparameters", True, f"{len(compared)} values equal scale {scale!r}")


def _safe_member(name: str) -> bool:
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts and not name.startswith(("/", "\\"))


def _check_item_scores(rep: VerifyReport, bdir: Path, results: list[dict], files: dict) -> None:
    """Recompute every claimed metric of each task from the bundle's per-item results; a mismatch fails.

    This proves the bundle consistent with itself (scores = what its predictions give), not that the
    predictions came from the model (module docstring)."""
    from benchmark.evaluate import items_path, metrics_from_items, read_items
    from benchmark.tasks import TASKS

    rfile = bdir / "results.jsonl"
    checked, problems, without = 0, [], []
    for r in results:
        key = r["key"]
        rel = f"{ITEMS_DIR}/{items_path(rfile, key).name}"
        if rel not in files:
            if key in TASKS and main_value(r) is not None:
                without.append(key)
            continue
        if key not in TASKS:
            problems.append(f"{key}: per-item file for a task curate does not know")
            continue
        try:
            items, meta = read_items(rfile, key, model_id=r.get("model_id"))
            got = metrics_from_items(TASKS[key], items, meta)
        except (CurateError, KeyError, ValueError) as e:
            problems.append(f"{key}: per-item results unreadable ({getattr(e, 'message', e)})")
            continue
        if meta.get("task") not in (None, key):
            problems.append(f"{key}: per-item file is of task {meta.get('task')!r}")
        fp = r.get("evalset_fingerprint")
        if fp is not None and meta.get("evalset_fingerprint") not in (None, fp):
            problems.append(f"{key}: per-item file is of eval set {meta.get('evalset_fingerprint')}, results.jsonl "
                            f"claims {fp}")
        claimed = r.get("metrics") if isinstance(r.get("metrics"), dict) else {}
        mm = r.get("main_metric")
        if isinstance(mm, str) and got.get(mm) is None:
            problems.append(f"{key}: main metric {mm} cannot be recomputed from the per-item results")
        for name, v in claimed.items():
            g = got.get(name)
            if name not in got or v is None or g is None:
                continue
            if not isinstance(v, (int, float)) or not math.isclose(float(v), float(g), rel_tol=SCORE_TOL,
                                                                    abs_tol=SCORE_TOL):
                problems.append(f"{key}: {name} claimed {v!r}, its per-item results give {g!r}")
        checked += 1
    if problems:
        rep.add("item scores", False, "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""))
    elif checked:
        extra = f"; warning: {len(without)} scored task(s) without per-item results" if without else ""
        rep.add("item scores", True, f"{checked} task(s) recomputed from per-item results{extra}")
    else:
        rep.checks.append(("item scores", True, "warning: no per-item results in the bundle; scores not recomputed"))


def _num_eq(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def verify_dir(bdir: Path, pool: Path, require_success: bool = False) -> VerifyReport:
    rep = VerifyReport(ok=True)
    try:
        decl = read_json(bdir / "bundle.json", "bundle declaration written by `curate submit`")
    except CurateError as e:
        rep.add("bundle.json", False, e.message)
        return rep
    rep.bundle = decl
    for f in BUNDLE_FILES_REQUIRED:
        if not (bdir / f).is_file():
            rep.add("files present", False, f"{f} is missing from the bundle")
    if not rep.ok:
        return rep
    # 1. every file matches the hash declared for it, and nothing declared is absent
    files = decl.get("files") or {}
    unsafe = [f for f in files if not _safe_member(f)]
    if unsafe:
        rep.add("file hashes", False, f"bundle.json lists files outside the bundle: {', '.join(sorted(unsafe))[:200]}")
        return rep
    bad = [f for f, h in files.items() if not (bdir / f).is_file() or sha256_file(bdir / f) != h]
    undeclared = [f for f in BUNDLE_FILES_REQUIRED if f not in files]
    undeclared_items = sorted(f"{ITEMS_DIR}/{p.name}" for p in (bdir / ITEMS_DIR).glob("*")
                              if f"{ITEMS_DIR}/{p.name}" not in files) if (bdir / ITEMS_DIR).is_dir() else []
    if bad or undeclared or undeclared_items:
        detail = ""
        if bad:
            detail += f"sha256 mismatch or missing: {', '.join(sorted(bad))}"
        if undeclared:
            detail += (" ; " if detail else "") + f"not declared in bundle.json: {', '.join(undeclared)}"
        if undeclared_items:
            detail += (" ; " if detail else "") + f"not declared in bundle.json: {', '.join(undeclared_items)}"
        rep.add("file hashes", False, detail)
    else:
        rep.add("file hashes", True, f"{len(files)} files match bundle.json")
    # 2. the uid file: format, its own sha256 file, declared size
    try:
        arr = uidlib.load(bdir / "uids.npy")
    except CurateError as e:
        rep.add("uids.npy", False, e.message)
        return rep
    actual_sha = sha256_file(bdir / "uids.npy")
    side = (bdir / "uids.npy.sha256").read_text().split()
    if not side or side[0] != actual_sha or decl.get("uids_sha256") != actual_sha:
        rep.add("uids sha256", False, f"uids.npy hashes to {actual_sha[:16]}..., declared "
                f"{(side[0] if side else '?')[:16]}... (uids.npy.sha256) / {str(decl.get('uids_sha256'))[:16]}... (bundle.json)")
    else:
        rep.add("uids sha256", True, actual_sha[:16] + "...")
    if decl.get("subset_size") != len(arr):
        rep.add("declared size", False, f"bundle.json declares {decl.get('subset_size')} samples, uids.npy holds {len(arr)}")
    else:
        rep.add("declared size", True, f"{len(arr)} uids")
    # 3. the training run matches the bundle and used the official hyperparameters of its scale
    info = read_json(bdir / "info.json", "training info")
    scale = first(info, "scale", "scale_name")
    if isinstance(scale, dict):
        scale = scale.get("name")
    if scale != decl.get("scale"):
        rep.add("scale", False, f"bundle.json declares scale {decl.get('scale')!r}, info.json says {scale!r}")
    if first(info, "seed") != decl.get("seed"):
        rep.add("seed", False, f"bundle.json declares seed {decl.get('seed')!r}, info.json says {info.get('seed')!r}")
    n_train = first(info, "subset_size", "n_samples", "num_samples")
    if isinstance(info.get("subset"), dict):
        n_train = first(info["subset"], "size", "n", "count", default=n_train)
    if isinstance(n_train, int) and n_train != len(arr):
        rep.add("declared size", False, f"info.json says the run trained on {n_train} samples, uids.npy holds {len(arr)}")
    manifest_path = bdir / "manifest.json"
    if manifest_path.is_file():
        man = read_json(manifest_path, "filter manifest")
        final = first(man, "n_kept", "kept", "output_count", "subset_size")
        if isinstance(final, int) and final != len(arr):
            rep.add("manifest count", False, f"manifest.json says {final} kept, uids.npy holds {len(arr)}")
    _check_hparams(rep, info, str(scale))
    # 4. results cover the declared tasks, and the declared average is what they give
    try:
        results = read_results(bdir / "results.jsonl")
    except CurateError as e:
        rep.add("results", False, e.message)
        results = None
    if results is not None:
        keys = {r["key"] for r in results}
        declared_tasks = set(decl.get("tasks") or [])
        absent = sorted(declared_tasks - keys)
        extra = sorted(keys - declared_tasks)
        if absent or not declared_tasks:
            rep.add("task coverage", False, f"declared tasks without a result: {', '.join(absent) or '(none declared)'}")
        elif extra:
            rep.add("task coverage", False, f"results for undeclared tasks: {', '.join(extra)}")
        else:
            rep.add("task coverage", True, f"{len(keys)} tasks")
        avg, missing = average_score(results)
        dav = decl.get("average")
        if (avg is None) != (dav is None) or (avg is not None and not math.isclose(avg, float(dav), abs_tol=1e-9)):
            rep.add("average", False, f"bundle.json declares average {dav!r}, results.jsonl gives {avg!r}")
        else:
            rep.add("average", True, f"{avg:.4f} over {len(results) - len(missing)} scored tasks" if avg is not None else "no scored task")
        _check_item_scores(rep, bdir, results, files)
    # 5. every uid is in the pool
    _check_uids_in_pool(rep, arr, pool, require_success)
    _note_completeness(rep, decl, pool)
    return rep


def _note_completeness(rep: VerifyReport, decl: dict, pool: Path) -> None:
    """Informational: the pool completeness the bundle declares beside that of the pool verified against
    (a subset filtered from a less complete copy of the pool is a valid bundle, but not comparable)."""
    from curate.pool.completeness import pool_completeness

    claimed = decl.get("pool_completeness") if isinstance(decl.get("pool_completeness"), dict) else {}
    here = pool_completeness(pool) if Path(pool).is_dir() else {"success_share": None, "note": "a uid list"}
    a, b = claimed.get("success_share"), here.get("success_share")
    if a is None or b is None:
        detail = (f"declared {claimed.get('note') or 'not recorded'}; this pool: {here.get('note')}")
    else:
        detail = f"declared {a:.1%} of the input downloaded, this pool {b:.1%}"
        if abs(a - b) > 0.02:
            detail = "warning: " + detail + " (scores are comparable only between equally complete pools)"
    rep.checks.append(("pool completeness", True, detail))


def verify(cfg: VerifyConfig) -> VerifyReport:
    """Check a bundle directory or tarball against a pool; never raises for a tampered bundle (see report.ok)."""
    bundle = Path(cfg.bundle)
    if not bundle.exists():
        raise CurateError(f"{bundle}: no such bundle")
    if bundle.is_dir():
        return verify_dir(bundle, Path(cfg.pool), cfg.require_success)
    with tempfile.TemporaryDirectory(prefix="curate-verify-") as tmp:
        bdir = safe_extract(bundle, Path(tmp))
        return verify_dir(bdir, Path(cfg.pool), cfg.require_success)


# ----------------------------------------------------------------------------------------------- CLI

@click.command("submit")
@click.argument("run", type=click.Path(path_type=Path, file_okay=False))
@click.option("--name", help="Submission name on the leaderboard (default: the recipe's name, else the RUN folder name).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False),
              help="Bundle directory to write (default RUN/submission); a .tar.gz of it is written beside it.")
@click.option("--subset", type=click.Path(path_type=Path, file_okay=False),
              help="The SUBSET the run trained on, when info.json's recorded path has moved.")
@click.option("--db", "db", type=click.Path(path_type=Path, dir_okay=False),
              help="Also add the bundle to this local leaderboard (DuckDB file).")
@click.option("--leaderboard/--no-leaderboard", default=True, show_default=True,
              help="Add the bundle to the local leaderboard (--db, or the default leaderboard file).")
def submit_command(run: Path, name: str | None, out: Path | None, subset: Path | None, db: Path | None,
                   leaderboard: bool) -> None:
    """Pack a finished RUN into a bundle anyone can verify: results.jsonl (DataComp format), the per-item
    results (results.items/), uids.npy and its sha256, the recipe, the filter manifest, the training info.json,
    tool versions, and the completeness of the pool the subset came from.

    Re-running on an unchanged RUN rewrites nothing. Check a bundle with `curate verify BUNDLE --pool POOL`.
    """
    from benchmark.leaderboard import default_db

    target = (db or default_db()) if leaderboard else None
    s = submit(SubmitConfig(run=run, name=name, out=out, subset=subset, leaderboard_db=target))
    state = "already up to date" if s["unchanged"] else "written"
    avg = f"{s['average']:.4f}" if s["average"] is not None else "n/a"
    click.echo(f"bundle {s['bundle']} ({state}); tarball {s['tarball']}")
    click.echo(f"  name={s['name']} scale={s['scale']} seed={s['seed']} size={s['subset_size']} "
               f"tasks={len(s['tasks'])} average={avg}")
    if target is not None:
        click.echo(f"  recorded in leaderboard {target}")


@click.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True))
@click.option("--pool", required=True, type=click.Path(path_type=Path, exists=True),
              help="POOL directory (its metadata/*.parquet lists the pool's uids) or a DataComp uids.npy of the pool.")
@click.option("--require-success", is_flag=True,
              help="Also fail when a uid exists in the pool but did not download successfully there.")
def verify_command(bundle: Path, pool: Path, require_success: bool) -> None:
    """Verify a submission bundle (directory or .tar.gz) against a pool.

    Checks: every file matches its declared sha256; uids.npy is valid DataComp format and its size equals the
    declared size; every uid exists in the pool; the run used the official hyperparameters of its scale
    (benchmark/scales.py); results cover the declared tasks and give the declared average; every score is what
    the bundle's per-item results give (this proves the bundle consistent with itself, not that a re-hashed
    fabricated one is honest: docs/FORMATS.md, "Submission bundle"). Tarballs are
    extracted safely (no absolute paths, '..' or links). Exits 1 and names the reason when a check fails.
    """
    rep = verify(VerifyConfig(bundle=bundle, pool=pool, require_success=require_success))
    for check, passed, detail in rep.checks:
        mark = "ok  " if passed else "FAIL"
        click.echo(f"  {mark} {check:<26} {detail}")
    if rep.ok:
        click.echo(f"VERIFIED {bundle}")
    else:
        click.echo(f"NOT VERIFIED {bundle}: " + "; ".join(rep.reasons), err=True)
        sys.exit(1)
