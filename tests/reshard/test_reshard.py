"""curate reshard: DataComp resharder semantics, counts that reconcile, resume, idempotence."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from curate.core import uids as uidlib
from curate.core.atomic import write_parquet
from curate.core.errors import CurateError
from curate.reshard.stage import ReshardConfig, reshard, reshard_cmd
from tests.pool_factory import make_pool


def _read_shards(folder: Path) -> list[dict]:
    """Every sample of every output shard, read with webdataset (what the trainer uses)."""
    import webdataset as wds

    tars = sorted(str(p) for p in folder.glob("*.tar"))
    ds = wds.WebDataset(tars, shardshuffle=False)
    return [
        {"key": s["__key__"], "jpg": s["jpg"], "txt": s["txt"].decode(), "json": json.loads(s["json"])}
        for s in ds
    ]


@pytest.fixture
def pool_and_subset(tmp_path):
    fp = make_pool(tmp_path / "pool", n_shards=3, per_shard=12, corrupt=1, failed=2)
    ok = fp.success_uids()
    subset = tmp_path / "subset"
    subset.mkdir()
    # 10 uids once, 3 uids three times (upsampling), 2 failed-to-download uids, 2 uids not in the pool
    # (spread over the three shards)
    chosen = ok[0:30:3] + [ok[1], ok[4], ok[29]] * 3 + fp.failed_uids[:2] + ["f" * 32, "0" * 32]
    uidlib.save(subset / "uids.npy", chosen)
    return fp, subset, chosen


def test_counts_duplicates_and_missing(pool_and_subset):
    fp, subset, chosen = pool_and_subset
    s = reshard(ReshardConfig(subset=subset, pool=fp.pool, shard_size=7, workers=2, progress=False))
    samples = _read_shards(subset / "shards")
    assert s["n_subset_rows"] == len(chosen) == 23
    assert s["n_written"] == len(samples) == 10 + 9
    assert s["n_missing_unique"] == 4 and s["n_missing_rows"] == 4
    assert s["n_error_rows"] == 0 and s["reconciles"]
    # balanced by sample count: 7, 7, 5
    assert [x["n_samples"] for x in s["shards"]] == [7, 7, 5]
    keys = Counter(x["key"] for x in samples)
    assert all(c == 1 for c in keys.values())
    for u in chosen[:10]:
        assert u in keys
    for u in {chosen[10], chosen[11], chosen[12]}:
        assert {f"{u}-0", f"{u}-1", f"{u}-2"} <= set(keys) and u not in keys
    # images are the pool's exact bytes, json names the uid, captions are the pool's
    imgs, texts = fp.image_bytes(), fp.texts()
    for x in samples:
        assert x["jpg"] == imgs[x["json"]["uid"]]
        assert x["txt"] == texts[x["json"]["uid"]]
    missing = pa.parquet.read_table(subset / "shards" / "missing_uids.parquet").to_pylist()
    assert {m["uid"] for m in missing} == set(fp.failed_uids[:2]) | {"f" * 32, "0" * 32}
    meta = json.loads((subset / "shards" / "meta.json").read_text())
    assert meta["n_written"] == 19
    sizes = json.loads((subset / "shards" / "sizes.json").read_text())
    assert sum(sizes.values()) == 19


def test_text_augmented_is_caption(pool_and_subset, tmp_path):
    fp, subset, chosen = pool_and_subset
    u = chosen[0]
    write_parquet(subset / "subset.parquet", pa.table({
        "uid": [u, chosen[1]], "text": ["a", "b"], "text_augmented": ["a clearer caption", None]}))
    reshard(ReshardConfig(subset=subset, pool=fp.pool, shard_size=100, workers=1, progress=False))
    by_key = {x["key"]: x for x in _read_shards(subset / "shards")}
    assert by_key[u]["txt"] == "a clearer caption"
    assert by_key[u]["json"]["text_original"] == fp.texts()[u]
    assert by_key[chosen[1]]["txt"] == fp.texts()[chosen[1]]


def test_rerun_is_noop_and_resume_after_kill(pool_and_subset):
    fp, subset, _ = pool_and_subset
    cfg = ReshardConfig(subset=subset, pool=fp.pool, shard_size=5, workers=1, progress=False)
    first = reshard(cfg)
    out = subset / "shards"
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = reshard(cfg)
    assert again["up_to_date"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes

    # simulate a kill: meta.json never written, one shard's stats lost, one stray temp file
    (out / "meta.json").unlink()
    (out / "00000002.stats.json").unlink()
    (out / ".tmp-00000003.tar.abc.tar").write_bytes(b"partial")
    resumed = reshard(cfg)
    assert resumed["shards_resumed"] == first["n_shards"] - 1
    assert resumed["n_written"] == first["n_written"]
    assert not list(out.glob(".tmp-*"))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name != "00000002.tar"} == {
        k: v for k, v in mtimes.items() if k != "00000002.tar"}

    # a changed subset recomputes and leaves no stale shard behind
    uidlib.save(subset / "uids.npy", fp.success_uids()[:3])
    changed = reshard(cfg)
    assert changed["n_written"] == 3 and sorted(p.name for p in out.glob("*.tar")) == ["00000000.tar"]


def test_corrupt_shard_is_recorded_not_fatal(pool_and_subset):
    fp, subset, chosen = pool_and_subset
    shard1 = fp.pool / "shards" / "00000001.tar"
    data = shard1.read_bytes()
    shard1.write_bytes(data[: len(data) // 3])  # truncated tar: later samples of shard 1 are lost
    s = reshard(ReshardConfig(subset=subset, pool=fp.pool, shard_size=50, workers=1, progress=False))
    assert s["n_error_rows"] > 0
    assert s["reconciles"]  # written + missing + errors == rows of uids.npy
    stats = json.loads((subset / "shards" / "00000000.stats.json").read_text())
    assert any("00000001.tar" in e["shard"] for e in stats["errors"])


def test_clear_errors(tmp_path, pool_and_subset):
    fp, subset, _ = pool_and_subset
    with pytest.raises(CurateError, match="not a pool"):
        reshard(ReshardConfig(subset=subset, pool=tmp_path, progress=False))
    with pytest.raises(CurateError, match="pass --pool"):
        reshard(ReshardConfig(subset=subset, progress=False))
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "uids.npy", np.arange(3))
    with pytest.raises(CurateError, match="uids.npy: dtype"):
        reshard(ReshardConfig(subset=bad, pool=fp.pool, progress=False))


def test_cli_and_uid_with_path_chars_cannot_escape(pool_and_subset):
    fp, subset, _ = pool_and_subset
    r = CliRunner().invoke(reshard_cmd, ["--subset", str(subset), "--pool", str(fp.pool), "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "wrote 19 samples" in r.output and "4 subset uids" in r.output
    r = CliRunner().invoke(reshard_cmd, ["--subset", str(subset), "--pool", str(fp.pool)])
    assert r.exit_code == 0 and "already up to date" in r.output
    # every member name is a flat {uid}[-j].ext, whatever the pool's member names were
    for tar in (subset / "shards").glob("*.tar"):
        with tarfile.open(tar) as tf:
            for name in tf.getnames():
                assert "/" not in name and ".." not in name


def test_pool_with_no_successful_rows_reshards_to_nothing_and_reconciles(tmp_path):
    # every row failed to download (e.g. every URL refused): reshard must report all uids missing, not crash
    fp = make_pool(tmp_path / "pool", n_shards=2, per_shard=4, corrupt=0, failed=4)
    subset = tmp_path / "subset"
    subset.mkdir()
    uidlib.save(subset / "uids.npy", fp.failed_uids[:3])
    s = reshard(ReshardConfig(subset=subset, pool=fp.pool, shard_size=7, workers=1, progress=False))
    assert s["n_written"] == 0 and s["n_missing_unique"] == 3 and s["reconciles"]
    tars = sorted((subset / "shards").glob("*.tar"))
    assert not tars or _read_shards(subset / "shards") == []
    assert sum(json.loads((subset / "shards" / "sizes.json").read_text()).values()) == 0


@pytest.mark.slow
def test_reshard_on_a_two_node_ray_cluster_gives_the_same_shards_as_a_local_run(pool_and_subset, tmp_path):
    # `curate reshard --ray-address` on a head and a second node (one CPU each, both on 127.0.0.1): the output
    # shards are one Ray task each, spread over both nodes, and byte-identical to a local run's
    import subprocess
    import sys

    pytest.importorskip("ray")
    from tests.ray_factory import WAIT, local_cluster

    fp, subset, _ = pool_and_subset
    local = reshard(ReshardConfig(subset=subset, pool=fp.pool, shard_size=4, workers=1, out=tmp_path / "local",
                                  progress=False))
    with local_cluster(nodes=2) as c:
        assert len(c.raylets()) == 2
        r = subprocess.run([sys.executable, "-m", "curate.cli", "reshard", "--subset", str(subset), "--pool",
                            str(fp.pool), "--shard-size", "4", "--out", str(tmp_path / "ray"), "--ray-address",
                            c.address], env=c.env, capture_output=True, text=True, timeout=WAIT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "wrote 19 samples in 5 shards" in r.stdout
    tars = lambda d: {p.name: p.read_bytes() for p in sorted(d.glob("*.tar"))}  # noqa: E731
    assert len(tars(tmp_path / "ray")) == local["n_shards"] == 5
    assert tars(tmp_path / "ray") == tars(tmp_path / "local")
    meta = json.loads((tmp_path / "ray" / "meta.json").read_text())
    assert meta["fingerprint"] == local["fingerprint"] and meta["shards"] == local["shards"] and meta["reconciles"]
