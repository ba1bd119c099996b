"""SIGKILL at seeded random points, rerun, and the outputs equal an uninterrupted run's; no temp files.

Stages whose own tests already kill a real process are not repeated here: download
(tests/pool/test_download.py), embed (tests/embed/test_embed.py), train (tests/benchmark/test_train.py). The filter's and
reshard's own tests only *simulate* a kill (files deleted by hand); here a real `curate filter` /
`curate reshard` / `curate evaluate` / `curate submit` process is killed with SIGKILL while it works
(submit's writes are slowed down by an injected sitecustomize so a kill can land between any two files).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.reliability.helpers import sorted_table, temp_files

REPO = Path(__file__).resolve().parents[2]
SEED = 20261124
MODEL = "curate-debug__0123456789ab"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "curate.cli", *args]


def _env() -> dict:
    return {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(REPO)}


def _run_to_end(cmd: list[str]) -> float:
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return time.monotonic() - t0


def _kill_when(cmd: list[str], ready, timeout: float = 240) -> bool:
    """Start `cmd`; SIGKILL its whole process group as soon as `ready()` is true.

    Returns False when the process finished before `ready()` became true (nothing was killed).
    """
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if ready():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
                return True
            if proc.poll() is not None:
                return False
            time.sleep(0.01)
        raise AssertionError(f"{cmd}: did not reach the kill point in {timeout} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


# ---------------------------------------------------------------- filter


RECIPE = """\
name: killme
steps:
  - basic: {english: false}
  - clip_score: {model: curate-debug, keep_top_fraction: 0.5}
  - dedup: {on: image, threshold: 0.9}
"""


@pytest.fixture(scope="module")
def filter_pool_dir(tmp_path_factory) -> Path:
    from tests.metadata_factory import write_embeddings, write_metadata

    p = tmp_path_factory.mktemp("kill_filter") / "pool"
    write_metadata(p, n_rows=40_000, n_files=8, seed=21)
    write_embeddings(p, MODEL, dim=16, seed=22)
    (p.parent / "r.yaml").write_text(RECIPE)
    return p


def _filter_cmd(pool: Path, out: Path) -> list[str]:
    return _cli("filter", "--recipe", str(pool.parent / "r.yaml"), "--pool", str(pool), "--out", str(out),
                "--workers", "1", "--no-report")


def _filter_outputs(out: Path) -> dict:
    return {
        "subset": sorted_table(out / "subset.parquet", ["uid"]),
        "decisions": sorted_table(out / "decisions.parquet", ["uid", "step"]),
        "uids": (out / "uids.npy").read_bytes(),
    }


def test_filter_killed_at_random_points_resumes_to_the_same_outputs(filter_pool_dir, tmp_path):
    ref_out = tmp_path / "ref"
    _run_to_end(_filter_cmd(filter_pool_dir, ref_out))
    ref = _filter_outputs(ref_out)
    assert 0 < ref["subset"].num_rows < 40_000
    n_steps = len(list((ref_out / ".cache" / "steps").glob("*.parquet")))
    assert n_steps >= 3
    rng = random.Random(SEED)
    out = tmp_path / "killed"
    steps = out / ".cache" / "steps"
    # Kill points are progress events, not times (a time fraction of a reference run is meaningless when the
    # machine's load changes between runs): k cached step files exist, or subset.parquet does. Three of them,
    # in increasing order, the first always the earliest so the first run is killed while it works.
    events: list = [*range(1, n_steps + 1), "subset"]
    points = [1, *sorted(rng.sample(events[1:], 2), key=events.index)]
    kills = []
    for k in points:
        def ready(k=k) -> bool:
            if k == "subset":
                return (out / "subset.parquet").exists()
            return steps.is_dir() and len(list(steps.glob("*.parquet"))) >= k

        kills.append(_kill_when(_filter_cmd(filter_pool_dir, out), ready))
        if kills[-1] and (out / "manifest.json").exists():
            # The kill can land after the run wrote its completion marker (manifest.json is written last)
            # and before the process exited: then every output must already be complete and correct.
            done = _filter_outputs(out)
            assert done["uids"] == ref["uids"] and done["subset"].equals(ref["subset"])
            assert done["decisions"].equals(ref["decisions"])
    # the first run starts from nothing and is killed at its first step file; later ones resume from the step
    # cache and may finish before their kill point (then the rerun below is a no-op check as well)
    assert kills[0], "the first run finished before its kill point: nothing was tested"
    _run_to_end(_filter_cmd(filter_pool_dir, out))
    got = _filter_outputs(out)
    assert got["uids"] == ref["uids"]
    assert got["subset"].equals(ref["subset"]) and got["decisions"].equals(ref["decisions"])
    assert not temp_files(out)
    p = subprocess.run(_filter_cmd(filter_pool_dir, out), cwd=REPO, env=_env(), capture_output=True, text=True)
    assert p.returncode == 0 and "already up to date" in p.stdout + p.stderr


# ---------------------------------------------------------------- reshard


@pytest.fixture(scope="module")
def reshard_inputs(tmp_path_factory) -> tuple[Path, list[str]]:
    from tests.pool_factory import make_pool

    fp = make_pool(tmp_path_factory.mktemp("kill_reshard") / "pool", n_shards=4, per_shard=150, corrupt=2, failed=3,
                   image_size=96)
    ok = fp.success_uids()
    rng = random.Random(SEED)
    return fp.pool, ok + rng.sample(ok, 100)  # upsampled rows too


def _reshard_cmd(pool: Path, subset: Path) -> list[str]:
    return _cli("reshard", "--subset", str(subset), "--pool", str(pool), "--shard-size", "20", "--workers", "1")


def _tars(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.tar"))}


def test_reshard_killed_at_random_shards_resumes_to_identical_tars(reshard_inputs, tmp_path):
    from tests.run_factory import make_subset

    pool, uids = reshard_inputs
    ref = make_subset(tmp_path / "ref", uids)
    _run_to_end(_reshard_cmd(pool, ref))
    ref_tars = _tars(ref / "shards")
    n = len(ref_tars)
    assert n == -(-len(uids) // 20)
    subset = make_subset(tmp_path / "killed", uids)
    rng = random.Random(SEED)
    kills = 0
    for _ in range(3):  # kill after a seeded random number of finished shards, three times
        k = rng.randrange(1, n)
        stats = subset / "shards"
        kills += _kill_when(_reshard_cmd(pool, subset),
                            lambda: len(list(stats.glob("*.stats.json"))) >= k if stats.exists() else False)
        assert not (stats / "meta.json").exists()
    assert kills >= 1
    _run_to_end(_reshard_cmd(pool, subset))
    assert _tars(subset / "shards") == ref_tars  # byte-identical shards
    import json

    meta = json.loads((subset / "shards" / "meta.json").read_text())
    assert meta["reconciles"] and meta["shards_resumed"] >= 1
    assert not temp_files(subset)
    ref_meta = json.loads((ref / "shards" / "meta.json").read_text())
    assert {k: meta[k] for k in ("n_written", "n_error_rows", "n_missing_rows")} == \
        {k: ref_meta[k] for k in ("n_written", "n_error_rows", "n_missing_rows")}


# ---------------------------------------------------------------- evaluate


@pytest.fixture(scope="module")
def eval_world(tmp_path_factory) -> dict:
    """A RUN with a random curate-debug checkpoint and the offline suite built from small generated
    pool splits plus real digits (5 tasks, each a few seconds on CPU)."""
    import shutil

    from benchmark import evalsets as E
    from tests.run_factory import checkpoint_run, random_checkpoint
    from tests.benchmark.test_evalsets import make_pool_evalsets

    root = tmp_path_factory.mktemp("kill_eval")
    run = checkpoint_run(root / "run", random_checkpoint(root / "model.pt"))
    ev = root / "evalsets"
    E.build_offline(E.BuildOfflineConfig(out=ev, pool_dir=make_pool_evalsets(root / "pool", n_per_class=6),
                                         limit=400))
    return {"run": run, "evalsets": ev, "shutil": shutil}


def _eval_cmd(run: Path, ev: Path) -> list[str]:
    return _cli("evaluate", "--run", str(run), "--evalsets", str(ev), "--workers", "0", "--batch-size", "16",
                "--device", "cpu")


def _eval_records(run: Path) -> dict:
    """Results by task without the wall time each took (the only field that may differ)."""
    import json

    recs = [json.loads(line) for line in (run / "eval_results.jsonl").read_text().splitlines() if line]
    return {r["key"]: {k: v for k, v in r.items() if k != "seconds"} for r in recs}


def test_evaluate_killed_after_random_tasks_resumes_to_the_same_results(eval_world, tmp_path):
    import json

    shutil = eval_world["shutil"]
    ref_run, run = tmp_path / "ref", tmp_path / "killed"
    shutil.copytree(eval_world["run"], ref_run)
    shutil.copytree(eval_world["run"], run)
    t_ref = _run_to_end(_eval_cmd(ref_run, eval_world["evalsets"]))
    ref = _eval_records(ref_run)
    assert len(ref) == 5
    rng = random.Random(SEED)
    results = run / "eval_results.jsonl"

    def tasks_done() -> int:
        try:
            return sum(1 for line in results.read_text().splitlines() if line)
        except FileNotFoundError:
            return 0

    kills = []
    k = rng.randrange(1, len(ref))  # after a seeded number of finished tasks ...
    kills.append(_kill_when(_eval_cmd(run, eval_world["evalsets"]), lambda: tasks_done() >= k))
    assert kills[0] and tasks_done() >= k and not (run / "eval_summary.json").exists()
    at = time.monotonic() + rng.uniform(0.3, 0.9) * t_ref  # ... and at a seeded moment of a resumed run
    kills.append(_kill_when(_eval_cmd(run, eval_world["evalsets"]), lambda: time.monotonic() >= at))
    partial = _eval_records(run)
    assert all(partial[key] == ref[key] for key in partial)  # what a killed run kept is already final
    _run_to_end(_eval_cmd(run, eval_world["evalsets"]))
    assert _eval_records(run) == ref
    summary = json.loads((run / "eval_summary.json").read_text())
    assert summary["aggregates"] == json.loads((ref_run / "eval_summary.json").read_text())["aggregates"]
    assert len(summary["reused"]) >= k  # finished tasks were not recomputed
    assert not temp_files(run)


# ---------------------------------------------------------------- submit

SLOW_WRITES = """
# sitecustomize for the submit kill test: every atomic write pauses 0.15 s with its temp file complete
# but not yet renamed, so a SIGKILL can land between any two of the bundle's files, or leave a temp file
# (a real submit writes them all in milliseconds).
import contextlib, os, time
if os.environ.get("CURATE_SLOW_WRITES"):
    import curate.core.atomic as a
    _atomic_path = a.atomic_path
    @contextlib.contextmanager
    def slow_atomic_path(dest, suffix=""):
        with _atomic_path(dest, suffix) as tmp:
            yield tmp
            time.sleep(0.15)
    a.atomic_path = slow_atomic_path
"""


def _bundle(run: Path) -> dict[str, bytes]:
    """The bundle's files; bundle.json without its creation time."""
    import json

    out = {p.name: p.read_bytes() for p in sorted((run / "submission").iterdir())}
    decl = json.loads(out.pop("bundle.json"))
    decl.pop("created_at")
    out["bundle.json"] = json.dumps(decl, sort_keys=True).encode()
    return out


def test_submit_killed_between_any_two_files_resumes_to_the_same_bundle(tmp_path):
    from tests.pool_factory import make_pool
    from tests.run_factory import make_run, make_subset

    fp = make_pool(tmp_path / "pool", n_shards=1, per_shard=12)
    subset = make_subset(tmp_path / "subset", fp.success_uids())
    ref_run, run = make_run(tmp_path / "ref", subset, seed=1), make_run(tmp_path / "killed", subset, seed=1)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_WRITES)
    slow = {"CURATE_SLOW_WRITES": "1", "PYTHONPATH": f"{site}{os.pathsep}{REPO}"}
    _run_to_end(_cli("submit", str(ref_run)))
    ref = _bundle(ref_run)
    bundle = run / "submission"
    n_files = len(ref)
    rng = random.Random(SEED)
    # kill once k files of the bundle exist (k seeded), and once the tarball's temp file exists
    points = [*sorted(rng.sample(range(1, n_files + 1), 3)), "tarball"]
    for k in points:
        def ready(k=k) -> bool:
            if k == "tarball":
                return any(run.glob(".tmp-submission.tar.gz.*"))
            return bundle.is_dir() and sum(1 for p in bundle.iterdir() if not p.name.startswith(".tmp-")) >= k

        proc_env = {**_env(), **slow}
        p = subprocess.Popen(_cli("submit", str(run)), cwd=REPO, env=proc_env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not ready() and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            assert p.poll() is None, f"submit finished before {k} files existed"
            os.killpg(p.pid, signal.SIGKILL)
        finally:
            p.wait(30)
        left_behind = bool(temp_files(run))
        # never presented as complete: a bundle whose bundle.json exists verifies, any other is partial
        if (bundle / "bundle.json").exists():
            assert {f: (bundle / f).read_bytes() for f in ref if f != "bundle.json"} == \
                {f: v for f, v in ref.items() if f != "bundle.json"}
    assert left_behind  # the tarball kill lands while its temp file exists: the rerun must remove it
    _run_to_end(_cli("submit", str(run)))
    assert _bundle(run) == ref
    assert (run / "submission.tar.gz").is_file() and not temp_files(run)
    p = subprocess.run(_cli("verify", str(run / "submission.tar.gz"), "--pool", str(fp.pool)), cwd=REPO, env=_env(),
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
