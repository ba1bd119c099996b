"""`curate pool verify`: a real downloaded pool passes; each kind of tampering is caught and named."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from curate.cli import main
from curate.pool.download import DownloadConfig, download
from curate.pool.verify import verify_pool


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A real pool: 10 images + one 404, 3 shards of 4 rows, downloaded from the loopback server."""
    from curate.pool.serve import running_server

    root = tmp_path_factory.mktemp("verify")
    www = root / "www"
    www.mkdir()
    for i in range(10):
        buf = io.BytesIO()
        Image.fromarray((np.random.RandomState(i).rand(20, 30, 3) * 255).astype("uint8")).save(buf, "PNG")
        (www / f"i{i}.png").write_bytes(buf.getvalue())
    with running_server(root, port=0) as base:
        urls = root / "urls.parquet"
        pq.write_table(pa.table({"url": [f"{base}/i{i}.png" for i in range(10)] + [f"{base}/gone.png"],
                                 "text": [f"image {i}" for i in range(11)]}), urls)
        download(DownloadConfig(urls=urls, out=root / "pool", shard_size=4, image_size=16, distributor="multiprocessing",
                                processes=1, threads=8, progress=False, echo=False, allow_loopback=True))
    return root / "pool"


@pytest.fixture
def copy(pool, tmp_path):
    dst = tmp_path / "pool"
    shutil.copytree(pool, dst)
    return dst


def verify_cli(path: Path, *args: str):
    return CliRunner().invoke(main, ["pool", "verify", str(path), *args])


def rewrite_tar(tar: Path, drop) -> None:
    """Rewrite `tar` without the members for which drop(name) is true."""
    with tarfile.open(tar) as tf:
        kept = [(m, tf.extractfile(m).read()) for m in tf if not drop(m.name)]
    with tarfile.open(tar, "w") as out:
        for m, data in kept:
            out.addfile(m, io.BytesIO(data))


def test_intact_pool_passes(pool):
    r = verify_cli(pool)
    assert r.exit_code == 0, r.output
    assert "OK: every input row is accounted for" in r.output
    report = json.loads(verify_cli(pool, "--json").output)
    assert report["ok"] and report["metadata_rows"] == 11 and report["tar_samples"] == report["success_rows"] == 10
    assert report["status_counts"] == {"success": 10, "failed_to_download": 1}


def test_deleted_tar_member_is_caught(copy):
    rewrite_tar(copy / "shards" / "00000001.tar", lambda name: name == "000000012.jpg")
    r = verify_cli(copy)
    assert r.exit_code == 1
    assert "1 success row(s) without a complete sample" in r.output and "00000001/000000012 (has json/txt)" in r.output


def test_removed_metadata_row_is_caught(copy):
    meta = copy / "metadata" / "00000000.parquet"
    t = pq.read_table(meta)
    pq.write_table(t.filter(pc.not_equal(t["key"], "000000002")), meta)
    r = verify_cli(copy)
    assert r.exit_code == 1
    assert "metadata has 10 rows, the input had 11" in r.output
    assert "1 tar sample(s) without a success row: 00000000/000000002" in r.output


def test_swapped_uid_with_same_count_is_caught(copy):
    meta = copy / "metadata" / "00000002.parquet"
    t = pq.read_table(meta)
    uids = t["uid"].to_pylist()
    uids[-1] = "0" * 32  # the failed row: no sample, so only the uid multiset can notice
    pq.write_table(t.set_column(t.schema.get_field_index("uid"), "uid", pa.array(uids, pa.string())), meta)
    r = verify_cli(copy)
    assert r.exit_code == 1 and "uid multiset digest" in r.output


def test_extra_sample_missing_tar_and_foreign_files_are_caught(copy):
    with tarfile.open(copy / "shards" / "00000000.tar", "a") as tf:
        data = b"x"
        info = tarfile.TarInfo("000000999.jpg")
        info.size = 1
        tf.addfile(info, io.BytesIO(data))
    (copy / "shards" / "00000002.tar").unlink()
    (copy / "metadata" / "00000007.parquet").write_bytes(b"")
    r = verify_cli(copy)
    assert r.exit_code == 1
    assert "00000000/000000999" in r.output
    assert "shard 00000002: tar 00000002.tar is missing" in r.output
    assert "metadata/00000007.parquet: not a shard of this pool" in r.output


def test_sample_json_with_wrong_uid_is_caught(copy):
    tar = copy / "shards" / "00000000.tar"
    with tarfile.open(tar) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf]
    with tarfile.open(tar, "w") as out:
        for m, data in members:
            if m.name == "000000001.json":
                data = json.dumps({**json.loads(data), "uid": "f" * 32}).encode()
                m.size = len(data)
            out.addfile(m, io.BytesIO(data))
    report = verify_pool(copy)
    assert not report.ok and report.uid_mismatch == ["00000000/000000001"]


def test_not_a_pool_is_a_clear_error(tmp_path):
    r = verify_cli(tmp_path)
    assert r.exit_code == 2 and "no pool.json" in r.output and "Traceback" not in r.output
