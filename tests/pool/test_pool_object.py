"""`curate.pool.pool.Pool.open`: validation with named errors, the two forms behind one object, and the one
sample reader's modes (read all, wanted keys only, headers only) with its caps."""

from __future__ import annotations

import io
import tarfile

import duckdb
import numpy as np
import pytest

from curate.core.errors import CurateError
from curate.pool.datacomp import ImportConfig, import_datacomp
from curate.pool.io import HEADERS, iter_members, iter_samples
from curate.pool.pool import DataCompPool, Pool, WebdatasetPool, batch_vectors
from tests.datacomp_factory import write_datacomp_pool
from tests.pool_factory import make_pool


def test_open_names_what_is_missing(tmp_path):
    with pytest.raises(CurateError, match="nowhere: not a pool directory \\(no such folder\\)"):
        Pool.open(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CurateError, match="not a pool directory \\(a file\\)"):
        Pool.open(tmp_path / "file")
    with pytest.raises(CurateError, match="no metadata/ folder"):
        Pool.open(tmp_path)
    (tmp_path / "metadata").mkdir()
    with pytest.raises(CurateError, match="metadata has no parquet files"):
        Pool.open(tmp_path)
    (tmp_path / "datacomp.json").write_text("{not json")
    with pytest.raises(CurateError, match="datacomp.json: unreadable"):
        Pool.open(tmp_path)


def test_webdataset_pool_views_shards_and_reader_modes(tmp_path):
    fp = make_pool(tmp_path / "pool", n_shards=2, per_shard=6, corrupt=1, failed=1)
    pool = Pool.open(fp.pool)
    assert isinstance(pool, WebdatasetPool) and not pool.is_datacomp and Pool.open(pool) is pool
    assert [s.index for s in pool.shards()] == [0, 1] and len(pool.metadata_files) == 2
    con = duckdb.connect()
    n, = con.execute(f"SELECT count(*) FROM ({pool.meta_view_sql()})").fetchone()
    assert n == 12 and pool.models() == []

    shard = pool.shards()[0]
    every = list(pool.samples(shard))
    assert len(every) == 5 and all(s.members for s in every if not s.error)
    wanted = {every[1].key, every[3].key}
    some = list(pool.samples(shard, keys=wanted))
    assert [s.key for s in some] == [every[1].key, every[3].key]
    assert [s.members for s in some] == [every[1].members, every[3].members]
    heads = list(pool.members(shard, read=HEADERS))
    assert len(heads) == sum(len(s.members) for s in every) and all(m.data is None for m in heads)
    jsons = [m for m in pool.members(shard, read={"json"}) if m.data is not None]
    assert len(jsons) == 5 and all(m.ext == "json" for m in jsons)


def test_one_member_cap_and_damaged_tars_in_every_mode(tmp_path):
    tar = tmp_path / "t.tar"
    with tarfile.open(tar, "w") as tf:
        for name, data in (("a.jpg", b"x" * 100), ("a.txt", b"cap"), ("b.jpg", b"y" * 10), ("b.json", b"{}"),
                           ("c.jpg", b"z" * 300), ("c.txt", b"last")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    got = list(iter_samples(tar, max_member_bytes=50))
    assert "is 100 bytes (cap 50)" in got[0].error and got[0].image is None and got[0].members == {}
    assert got[1].image == b"y" * 10 and not got[1].error
    assert [s.key for s in iter_samples(tar, keys={"b"}, max_member_bytes=50)] == ["b"]
    # every member is one header + one data block (1024 bytes): cut inside c.jpg's data
    tar.write_bytes(tar.read_bytes()[:4 * 1024 + 600])
    for kw in ({}, {"keys": {"a", "b", "c"}}):
        errs: list[str] = []
        # the sample being read when the tar broke (b: it may have had more members) is not handed out
        assert [s.key for s in iter_samples(tar, errs, **kw)] == ["a"]
        assert len(errs) == 1 and "t.tar: damaged or truncated tar" in errs[0]
    with pytest.raises(CurateError, match="t.tar: damaged or truncated tar"):
        list(iter_members(tar, read=HEADERS))


def test_datacomp_pool_behind_the_same_object(tmp_path):
    src = tmp_path / "src"
    write_datacomp_pool(src, n_rows=40, n_files=2, seed=1, dims={"b32": 8, "l14": 12})
    import_datacomp(ImportConfig(metadata_dir=src, out=tmp_path / "pool"))
    pool = Pool.open(tmp_path / "pool")
    assert isinstance(pool, DataCompPool) and pool.is_datacomp and pool.rows == 40
    assert pool.models() == ["ViT-B-32__openai", "ViT-L-14__openai"]
    assert pool.locate_uid_sql("x") is None
    with pytest.raises(CurateError, match="DataComp pool has metadata only"):
        pool.shards()
    con = duckdb.connect()
    t = con.sql(f"SELECT * FROM ({pool.embeddings_view_sql('ViT-B-32__openai')}) ORDER BY uid").to_arrow_table()
    assert t.num_rows == 40 and {"status", "clip_score", "_npz_src"} <= set(t.column_names)
    v = batch_vectors(t, "image_emb")
    assert v.shape == (40, 8) and np.isfinite(v).all()
