"""SIGKILL at seeded random points, rerun, and the outputs equal an uninterrupted run's; no temp files.

Stages whose own tests already kill a real process are not repeated here: download
(tests/test_download.py), embed (tests/test_embed.py), train (tests/test_train.py). The filter's and
reshard's own tests only *simulate* a kill (files deleted by hand); here a real `curate filter` /
`curate reshard` process is killed with SIGKILL while it works. Evaluate's own test covers a results
file missing a task; submit finishes in well under a second (nothing to kill part-way).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
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
    t_ref = _run_to_end(_filter_cmd(filter_pool_dir, ref_out))
    ref = _filter_outputs(ref_out)
    assert 0 < ref["subset"].num_rows < 40_000
    rng = random.Random(SEED)
    out = tmp_path / "killed"
    kills = []
    for _ in range(3):  # three kills of the same output folder, each at a seeded fraction of the full run time
        at = time.monotonic() + rng.uniform(0.2, 0.8) * t_ref
        kills.append(_kill_when(_filter_cmd(filter_pool_dir, out), lambda: time.monotonic() >= at))
        if kills[-1] and (out / "manifest.json").exists():
            # The kill can land after the run wrote its completion marker (manifest.json is written last)
            # and before the process exited: then every output must already be complete and correct.
            done = _filter_outputs(out)
            assert done["uids"] == ref["uids"] and done["subset"].equals(ref["subset"])
            assert done["decisions"].equals(ref["decisions"])
    # the first run starts from nothing, so it is always killed; later ones resume from the step cache and
    # may finish before their kill point (then the rerun below is a no-op check as well)
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
