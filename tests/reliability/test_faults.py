"""Faults: a full disk, a crashing worker, a parquet with a missing column or wrong type, embeddings for
another model, NaN scores, an empty pool. Each ends in a clear error or a recorded per-row failure,
never in an output that looks complete; a rerun after the fault is fixed gives the normal result.

Covered by the stages' own tests and not repeated: truncated/corrupt pool shards (tests/reshard/test_reshard.py,
tests/embed/test_embed.py), a download task failing after retries (tests/pool/test_download.py), an input table
with no rows or a missing column (tests/pool/test_download.py), NaN embeddings in dedup/semdedup/decontaminate.
"""

from __future__ import annotations

import math
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.core.errors import CurateError
from curate.filter.engine import FilterConfig, filter_pool
from tests.metadata_factory import write_embeddings, write_metadata
from tests.reliability.helpers import sorted_table, temp_files

REPO = Path(__file__).resolve().parents[2]
MODEL = "curate-debug__0123456789ab"
RECIPE = "name: f\nsteps:\n  - basic: {english: false}\n  - clip_score: {model: curate-debug, keep_top_fraction: 0.5}\n"


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("faults") / "pool"
    write_metadata(p, n_rows=20_000, n_files=4, seed=31)
    write_embeddings(p, MODEL, dim=16, seed=32)
    (p.parent / "r.yaml").write_text(RECIPE)
    return p


def _filter_cmd(pool: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "curate.cli", "filter", "--recipe", str(pool.parent / "r.yaml"), "--pool", str(pool),
            "--out", str(out), "--no-report", *extra]


def _env(**extra: str) -> dict:
    return {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(REPO), **extra}


def _outputs(out: Path) -> tuple:
    return (sorted_table(out / "subset.parquet", ["uid"]), sorted_table(out / "decisions.parquet", ["uid", "step"]),
            (out / "uids.npy").read_bytes())


@pytest.fixture(scope="module")
def reference(pool, tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("faults_ref") / "out"
    filter_pool(FilterConfig(recipe=str(pool.parent / "r.yaml"), pool=str(pool), out=str(out), progress=False,
                             report=False, workers=1))
    return _outputs(out)


def _disk_full(limit: int):
    def pre() -> None:
        # RLIMIT_FSIZE makes any write past `limit` bytes fail with EFBIG, like ENOSPC on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


@pytest.mark.parametrize("limit", [4_000, 150_000])
def test_filter_on_a_full_disk_fails_visibly_and_recovers(pool, reference, tmp_path, limit):
    out = tmp_path / "out"
    p = subprocess.run(_filter_cmd(pool, out, "--workers", "1"), cwd=REPO, env=_env(), capture_output=True, text=True,
                       preexec_fn=_disk_full(limit), timeout=300)
    assert p.returncode != 0
    assert "File too large" in p.stderr and "rerun the same command" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]  # one clear message, not a crash dump
    assert not (out / "manifest.json").exists()  # never presented as complete
    p = subprocess.run(_filter_cmd(pool, out, "--workers", "1"), cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    got = _outputs(out)
    assert got[0].equals(reference[0]) and got[1].equals(reference[1]) and got[2] == reference[2]
    assert not temp_files(out)


def test_reshard_on_a_full_disk_fails_visibly_and_recovers(tmp_path):
    from tests.pool_factory import make_pool
    from tests.run_factory import make_subset

    fp = make_pool(tmp_path / "pool", n_shards=2, per_shard=30, corrupt=1, failed=1)
    ref = make_subset(tmp_path / "ref", fp.success_uids())
    sub = make_subset(tmp_path / "sub", fp.success_uids())
    cmd = [sys.executable, "-m", "curate.cli", "reshard", "--pool", str(fp.pool), "--shard-size", "10", "--workers", "1"]
    assert subprocess.run(cmd + ["--subset", str(ref)], cwd=REPO, env=_env(), capture_output=True).returncode == 0
    p = subprocess.run(cmd + ["--subset", str(sub)], cwd=REPO, env=_env(), capture_output=True, text=True,
                       preexec_fn=_disk_full(30_000), timeout=300)
    assert p.returncode == 2 and "File too large" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not (sub / "shards" / "meta.json").exists()
    assert subprocess.run(cmd + ["--subset", str(sub)], cwd=REPO, env=_env(), capture_output=True).returncode == 0
    tars = lambda d: {p.name: p.read_bytes() for p in sorted((d / "shards").glob("*.tar"))}  # noqa: E731
    assert tars(sub) == tars(ref) and not temp_files(sub)


CRASHER = textwrap.dedent("""
    # Loaded by every Python process of the test (sitecustomize): a filter worker process dies mid-batch.
    import multiprocessing, os
    if os.environ.get("CRASH_FILTER_WORKER"):
        import filters.basic as b
        _apply = b.BasicFilter.apply
        def _die(self, batch):
            if multiprocessing.parent_process() is not None:  # in a worker, never in the main process
                os._exit(3)
            return _apply(self, batch)
        b.BasicFilter.apply = _die
""")


def test_filter_worker_process_crash_is_an_error_and_leaves_no_subset(pool, reference, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(CRASHER)
    out = tmp_path / "out"
    env = _env(CRASH_FILTER_WORKER="1", PYTHONPATH=f"{site}{os.pathsep}{REPO}")
    p = subprocess.run(_filter_cmd(pool, out, "--workers", "2", "--batch-rows", "3000"), cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0, "a dead worker must not give a successful run"
    assert "a worker process died" in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert not (out / "manifest.json").exists() and not (out / "subset.parquet").exists()
    p = subprocess.run(_filter_cmd(pool, out, "--workers", "2", "--batch-rows", "3000"), cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    got = _outputs(out)
    assert got[0].equals(reference[0]) and got[2] == reference[2] and not temp_files(out)


# ---------------------------------------------------------------- bad tables


def _one_file_pool(tmp_path: Path, table: pa.Table) -> Path:
    pool = tmp_path / "pool"
    (pool / "metadata").mkdir(parents=True)
    pq.write_table(table, pool / "metadata" / "00000000.parquet")
    return pool


def _basic(tmp_path: Path, pool: Path, recipe: str = "name: b\nsteps:\n  - basic: {english: false}\n") -> dict:
    (tmp_path / "b.yaml").write_text(recipe)
    return filter_pool(FilterConfig(recipe=str(tmp_path / "b.yaml"), pool=str(pool), out=str(tmp_path / "out"),
                                    progress=False, report=False, workers=1))


def test_metadata_missing_a_column_a_step_reads_is_a_curate_error_naming_it(tmp_path):
    t = write_metadata(tmp_path / "src", n_rows=50, seed=1)
    pool = _one_file_pool(tmp_path, t.drop(["text"]))
    with pytest.raises(CurateError, match=r"'text'"):
        _basic(tmp_path, pool)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_metadata_with_a_wrong_column_type_is_a_curate_error_not_a_crash(tmp_path):
    """Found by this suite: original_width as strings crashed filters/basic.py with pyarrow.ArrowTypeError;
    curate/filter/engine.py now checks the contract's column types up front."""
    t = write_metadata(tmp_path / "src", n_rows=50, seed=1)
    i = t.schema.get_field_index("original_width")
    pool = _one_file_pool(tmp_path, t.set_column(i, "original_width", pa.array([f"{w}px" for w in t["original_width"].to_pylist()])))
    with pytest.raises(CurateError, match="original_width"):
        _basic(tmp_path, pool)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_embeddings_for_another_model_are_refused_naming_both(pool, tmp_path):
    (tmp_path / "t.yaml").write_text("name: t\nsteps:\n  - clip_score: {model: curate-tiny, keep_top_fraction: 0.5}\n")
    with pytest.raises(CurateError, match=r"curate-tiny") as e:
        filter_pool(FilterConfig(recipe=str(tmp_path / "t.yaml"), pool=str(pool), out=str(tmp_path / "out"),
                                 progress=False, report=False))
    assert "curate-debug" in e.value.message  # says what the pool does have
    assert not (tmp_path / "out" / "subset.parquet").exists()


def test_nan_clip_scores_are_never_kept_and_are_recorded(tmp_path):
    src = write_metadata(tmp_path / "pool", n_rows=400, seed=5)
    ok = [u for u, s in zip(src["uid"].to_pylist(), src["status"].to_pylist()) if s == "success"]
    nan_uids = set(ok[::7])
    write_embeddings(tmp_path / "pool", MODEL, dim=8, seed=6, scores={u: math.nan for u in nan_uids})
    emb = pq.read_table(tmp_path / "pool" / "embeddings" / MODEL)
    assert sum(math.isnan(x) for x in emb["clip_score"].to_pylist() if x is not None) == len(nan_uids)
    (tmp_path / "n.yaml").write_text("name: n\nsteps:\n  - clip_score: {model: curate-debug, keep_top_fraction: 0.5}\n")
    s = filter_pool(FilterConfig(recipe=str(tmp_path / "n.yaml"), pool=str(tmp_path / "pool"), out=str(tmp_path / "out"),
                                 progress=False, report=False))
    kept = set(pq.read_table(tmp_path / "out" / "subset.parquet", columns=["uid"])["uid"].to_pylist())
    assert not kept & nan_uids
    led = pq.read_table(tmp_path / "out" / "decisions.parquet").to_pandas()
    step = led[led.step == s["steps"][-1]["step"]]
    assert set(step.uid) == set(ok) and step[step.uid.isin(nan_uids)].reason.notna().all()


def test_an_empty_pool_is_a_clear_error_or_an_empty_complete_subset(tmp_path):
    t = write_metadata(tmp_path / "src", n_rows=10, seed=1)
    pool = _one_file_pool(tmp_path, t.slice(0, 0))
    try:
        s = _basic(tmp_path, pool)
    except CurateError as e:
        assert "pool" in e.message.lower() or "rows" in e.message.lower()
        assert not (tmp_path / "out" / "manifest.json").exists()
        return
    assert s["pool_rows"] == 0 and s["kept"] == 0
    assert pq.read_table(tmp_path / "out" / "subset.parquet").num_rows == 0


# ---------------------------------------------------------------- a full disk in the other stages


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory) -> dict:
    """A small pool (2 shards), its resharded subset, a debug checkpoint in a RUN, the offline eval suite."""
    from benchmark import evalsets as E
    from curate.core import uids as uidlib
    from tests.run_factory import make_run, make_subset, random_checkpoint, resharded_subset
    from tests.benchmark.test_evalsets import make_pool_evalsets

    root = tmp_path_factory.mktemp("full_disk")
    pool, subset = resharded_subset(root, n_shards=2, per_shard=16)
    ckpt = random_checkpoint(root / "debug.pt")
    E.build_offline(E.BuildOfflineConfig(out=root / "evalsets", pool_dir=make_pool_evalsets(root / "evp"), limit=60))
    uids = uidlib.decode(uidlib.load(subset / "uids.npy"))
    return {"root": root, "pool": pool, "subset": subset, "ckpt": ckpt, "evalsets": root / "evalsets",
            "bundle_subset": make_subset(root / "bundle_subset", uids), "make_run": make_run}


def _stage_case(stage: str, inp: dict, tmp: Path, serve_dir=None) -> tuple[list[str], callable]:
    """(command, done?) for one stage writing into `tmp`; done() says whether its completion marker exists."""
    import json
    import shutil

    cli = [sys.executable, "-m", "curate.cli"]
    if stage == "download":
        from tests.pool.test_download import N_IMAGES, make_www

        make_www(tmp)
        base = serve_dir(tmp)
        urls = tmp / "urls.jsonl"
        urls.write_text("".join(json.dumps({"url": f"{base}/img{i % N_IMAGES}.png", "text": f"c {i}"}) + "\n"
                                for i in range(24)))
        pool = tmp / "pool"
        return (cli + ["download", "--urls", str(urls), "--out", str(pool), "--shard-size", "4", "--distributor",
                       "multiprocessing", "--processes", "1", "--threads", "2", "--image-size", "32",
                       "--allow-loopback"],
                lambda: (pool / "pool.json").exists() and json.loads((pool / "pool.json").read_text())["state"]
                == "complete")
    if stage == "embed":
        pool = tmp / "pool"
        shutil.copytree(inp["pool"], pool)
        return (cli + ["embed", "--pool", str(pool), "--model", "curate-debug", "--pretrained", str(inp["ckpt"]),
                       "--batch-size", "4", "--loader-workers", "1"],
                lambda: len(list((pool / "embeddings").glob("*/*.parquet"))) == 2)
    if stage == "train":
        run = tmp / "run"
        return (cli + ["train", "--data", str(inp["subset"]), "--scale", "debug", "--out", str(run), "--workers", "1"],
                lambda: (run / "final.pt").exists())
    if stage == "evaluate":
        from tests.run_factory import checkpoint_run

        run = checkpoint_run(tmp / "run", inp["ckpt"])
        return (cli + ["evaluate", "--run", str(run), "--evalsets", str(inp["evalsets"]), "--workers", "1"],
                lambda: (run / "eval_summary.json").exists())
    if stage == "submit":
        run = inp["make_run"](tmp / "run", inp["bundle_subset"])
        return cli + ["submit", str(run)], lambda: (run / "submission" / "bundle.json").exists()
    raise AssertionError(stage)


@pytest.mark.parametrize("stage,limit", [("download", 300), ("download", 20_000), ("embed", 300), ("train", 300),
                                         ("evaluate", 300), ("submit", 300)])
def test_a_full_disk_is_one_clear_error_and_a_rerun_finishes(stage, limit, stage_inputs, tmp_path, serve_dir):
    """Filter and reshard are above; here the other stages. The write that fails differs per stage
    (pool.json or an img2dataset shard in a worker process, a parquet shard, log.jsonl or a checkpoint, the
    results file, a bundle file): each must end in exit 2 with one message naming the cause and saying a
    rerun resumes, no traceback, no completion marker; and the rerun must indeed finish."""
    cmd, done = _stage_case(stage, stage_inputs, tmp_path, serve_dir)
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, preexec_fn=_disk_full(limit),
                       timeout=600)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "File too large" in p.stderr and "rerun the same command" in p.stderr, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert not done()
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert done() and not temp_files(tmp_path)


EMBED_CRASHER = textwrap.dedent("""
    # sitecustomize: the embed stage's decode worker process dies on its second batch.
    import os
    if os.environ.get("CRASH_EMBED_WORKER"):
        import curate.embed.stage as e
        _iter = e.ShardBatches.__iter__
        def _dying(self):
            from torch.utils.data import get_worker_info
            for i, b in enumerate(_iter(self)):
                if i == 1 and get_worker_info() is not None:
                    os._exit(3)
                yield b
        e.ShardBatches.__iter__ = _dying
""")


def test_embed_decode_worker_crash_is_one_clear_error_and_a_rerun_finishes(stage_inputs, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(EMBED_CRASHER)
    cmd, done = _stage_case("embed", stage_inputs, tmp_path)
    env = _env(CRASH_EMBED_WORKER="1", PYTHONPATH=f"{site}{os.pathsep}{REPO}")
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and "a worker process died" in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert not done()
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and done() and not temp_files(tmp_path), p.stderr[-3000:]
