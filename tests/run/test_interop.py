"""Interop (issue 9): a curated subset is usable outside curate.

`subset.parquet` loads in pandas, polars, DuckDB and Hugging Face `datasets` with the same rows as uids.npy, and
the resharded webdataset shards train with open_clip's own training script (`open_clip_train.main`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from curate.core import atomic, uids as uidlib
from tests.pool_factory import make_pool

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    from curate.filter.engine import FilterConfig, filter_pool
    from curate.reshard.stage import ReshardConfig, reshard

    tmp = tmp_path_factory.mktemp("interop")
    fp = make_pool(tmp / "pool", n_shards=2, per_shard=20, corrupt=0, failed=2)
    recipe = tmp / "no_filter.yaml"
    atomic.write_text(recipe, "name: no_filter\nsteps: []\n")
    out = tmp / "subset"
    filter_pool(FilterConfig(recipe=str(recipe), pool=str(fp.pool), out=str(out), report=False, progress=False))
    rs = reshard(ReshardConfig(subset=out, pool=fp.pool, shard_size=16, workers=1, progress=False))
    return fp, out, rs


def test_subset_parquet_loads_in_pandas_polars_duckdb_datasets(subset, tmp_path, monkeypatch):
    import duckdb
    import pandas as pd
    import polars as pl

    fp, out, _ = subset
    path = out / "subset.parquet"
    expected = sorted(uidlib.decode(np.load(out / "uids.npy")))
    assert expected == sorted(fp.success_uids())
    assert sorted(pd.read_parquet(path)["uid"]) == expected
    assert sorted(pl.read_parquet(path)["uid"].to_list()) == expected
    con = duckdb.connect()
    assert sorted(r[0] for r in con.execute(f"SELECT uid FROM read_parquet('{path}')").fetchall()) == expected
    con.close()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_parquet(str(path), cache_dir=str(tmp_path / "hf"))
    assert sorted(ds["uid"]) == expected
    assert {"uid", "url", "text"} <= set(ds.column_names)


def test_resharded_shards_train_with_open_clip_train(subset, tmp_path, monkeypatch):
    from open_clip_train.main import main as open_clip_train_main

    from curate.clip.models import load_model, register_configs

    fp, out, rs = subset
    shards = sorted((out / "shards").glob("*.tar"))
    assert len(shards) == rs["n_shards"] >= 2 and rs["n_written"] == len(fp.success_uids())
    register_configs()  # curate-debug is a project architecture: make it known to open_clip's factory
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        _run_open_clip_train(open_clip_train_main, out, shards, rs, tmp_path)
    finally:
        # open_clip_train sets the root logger to INFO with its own handlers; restore it for later tests
        root.setLevel(level)
        root.handlers[:] = handlers
    ckpt = tmp_path / "logs" / "oc" / "checkpoints" / "epoch_1.pt"
    assert ckpt.is_file()
    log = (tmp_path / "logs" / "oc" / "out.log").read_text()
    assert "Train Epoch: 0" in log  # it trained on our shards, not an empty stream
    assert load_model("curate-debug", str(ckpt), "cpu").model_id.startswith("curate-debug__")


def _run_open_clip_train(open_clip_train_main, out: Path, shards: list[Path], rs: dict, tmp_path: Path) -> None:
    first, last = shards[0].stem, shards[-1].stem
    open_clip_train_main([
        "--train-data", f"{out / 'shards'}/{{{first}..{last}}}.tar",
        "--train-num-samples", str(rs["n_written"]), "--dataset-type", "webdataset",
        "--model", "curate-debug", "--batch-size", "8", "--epochs", "1", "--workers", "0",
        "--lr", "1e-3", "--warmup", "1", "--device", "cpu", "--precision", "fp32",
        "--logs", str(tmp_path / "logs"), "--name", "oc", "--save-frequency", "1", "--report-to", "",
        "--seed", "0",
    ])
