"""The shard table POOL/shards/sizes.json (curate.pool.shard_table): written by `curate download` with each
shard's success count, kept right across resume and --retry-failed, checked by `curate pool verify`.

The table is what DataComp's resharder reads for shard sizes (`--shard-table sizes.json` relative to its
`--input-dir`, keys = shard file names `{:08d}.tar`, values = sample counts) and what open_clip_train's
`get_dataset_size` reads; the latter is installed, so it is exercised here on a real pool.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from curate.cli import main
from curate.core.errors import CurateError
from curate.pool.download import DownloadConfig, download
from curate.pool.shard_table import SIZES_FILE, read_shard_table, write_shard_table
from curate.pool.verify import verify_pool


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(20, 30, 3) * 255).astype("uint8")).save(buf, "PNG")
    return buf.getvalue()


def make_www(root: Path, n: int = 8) -> None:
    (root / "www").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / "www" / f"i{i}.png").write_bytes(png(i))


def cfg(urls: Path, out: Path, **kw) -> DownloadConfig:
    base = dict(shard_size=3, image_size=16, distributor="multiprocessing", processes=1, threads=4, timeout=5.0,
                progress=False, echo=False, allow_loopback=True)  # the loopback test server
    return DownloadConfig(urls=urls, out=out, **{**base, **kw})


def table_of(pool: Path) -> dict[str, int]:
    return json.loads((pool / "shards" / SIZES_FILE).read_text())


def samples_in_tars(pool: Path) -> dict[str, int]:
    """Samples per tar, counted from the tars themselves (one .json member per sample)."""
    out = {}
    for t in sorted((pool / "shards").glob("*.tar")):
        with tarfile.open(t) as tf:
            out[t.name] = sum(m.name.endswith(".json") for m in tf)
    return out


def successes_in_metadata(pool: Path) -> dict[str, int]:
    return {f"{p.stem}.tar": pq.read_table(p, columns=["status"])["status"].to_pylist().count("success")
            for p in sorted((pool / "metadata").glob("*.parquet"))}


def verify_cli(pool: Path, *args: str):
    return CliRunner().invoke(main, ["pool", "verify", str(pool), *args])


# 4 shards of 3 rows: 2, 1, 3 and 0 successes (the last shard holds only a rejected row: an empty tar)
ROWS = [("i0.png", "a"), ("i1.png", "b"), ("missing.png", "c"),
        ("i2.png", "d"), ("gone.png", "e"), ("also-gone.png", "f"),
        ("i3.png", "g"), ("i4.png", "h"), ("i5.png", "i"),
        ("ftp://example.com/x.png", "ftp")]
EXPECTED = {"00000000.tar": 2, "00000001.tar": 1, "00000002.tar": 3, "00000003.tar": 0}


def write_urls(path: Path, base: str, rows=ROWS) -> Path:
    pq.write_table(pa.table({"url": [u if "://" in u else f"{base}/{u}" for u, _ in rows],
                             "text": [t for _, t in rows]}), path)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(root, urls, pool): one real download from the loopback server, which stays up for the module."""
    from curate.pool.serve import running_server

    root = tmp_path_factory.mktemp("sizes")
    make_www(root)
    with running_server(root, port=0) as base:
        urls = write_urls(root / "urls.parquet", base)
        download(cfg(urls, root / "pool"))
        yield root, urls, root / "pool"


@pytest.fixture
def copy(served, tmp_path):
    root, urls, pool = served
    dst = tmp_path / "pool"
    shutil.copytree(pool, dst)
    return urls, dst


def test_download_writes_the_table_with_each_shards_success_count(served):
    _, _, pool = served
    assert table_of(pool) == EXPECTED
    # the same numbers three ways: the table, the metadata's success rows, the samples in the tars
    assert successes_in_metadata(pool) == samples_in_tars(pool) == EXPECTED
    # keys are the tar file names DataComp's default --shard-format produces, one per tar, nothing else
    assert sorted(table_of(pool)) == sorted(p.name for p in (pool / "shards").glob("*.tar"))
    report = verify_pool(pool)
    assert report.ok and report.sizes_table == "ok" and not report.warnings, report.table()


def test_open_clip_train_reads_the_pools_size_from_it(served):
    from open_clip_train.data import get_dataset_size

    _, _, pool = served
    assert get_dataset_size(f"{pool / 'shards'}/{{00000000..00000003}}.tar") == (6, 4)
    assert get_dataset_size(f"{pool / 'shards'}/{{00000001..00000002}}.tar") == (4, 2)


def test_retry_failed_rewrites_the_table(tmp_path, serve_dir):
    make_www(tmp_path)
    base = serve_dir(tmp_path)
    rows = [("i0.png", "a"), ("late.png", "b"), ("i1.png", "c"), ("late2.png", "d"), ("i2.png", "e")]
    urls = write_urls(tmp_path / "urls.parquet", base, rows)
    pool = tmp_path / "pool"
    download(cfg(urls, pool))
    assert table_of(pool) == {"00000000.tar": 2, "00000001.tar": 1}
    (tmp_path / "www" / "late.png").write_bytes(png(40))
    (tmp_path / "www" / "late2.png").write_bytes(png(41))
    download(cfg(urls, pool, retry_failed=True, retry_permanent=True))  # the 404s are permanent failures
    assert table_of(pool) == successes_in_metadata(pool) == samples_in_tars(pool) == {"00000000.tar": 3,
                                                                                      "00000001.tar": 2}
    assert verify_pool(pool).ok


def test_resumed_run_rebuilds_the_table_from_the_shards_on_disk(copy):
    """A run killed between a shard's tar and its metadata, whose table still holds stale entries: the
    resumed run redoes that shard and ends with the table the metadata says, not the stale one."""
    urls, pool = copy
    (pool / "metadata" / "00000002.parquet").unlink()  # shard 2 is not finished any more
    pool_json = json.loads((pool / "pool.json").read_text())
    (pool / "pool.json").write_text(json.dumps({**pool_json, "state": "in_progress"}))
    (pool / "shards" / SIZES_FILE).write_text(json.dumps({"00000000.tar": 7, "00000002.tar": 3, "00000009.tar": 1}))
    summary = download(cfg(urls, pool))
    assert summary["state"] == "complete" and summary["runs"][-1]["shards_run"] == 1
    assert table_of(pool) == EXPECTED


def test_pool_from_before_the_table_warns_in_verify_and_a_rerun_writes_it(copy):
    urls, pool = copy
    (pool / "shards" / SIZES_FILE).unlink()
    r = verify_cli(pool)
    assert r.exit_code == 0, r.output  # a warning: every row is still accounted for
    assert f"WARNING: shards/{SIZES_FILE} is missing" in r.output and "IndexError" in r.output
    assert f"curate download --urls {urls.resolve()} --out {pool}" in r.output
    report = json.loads(verify_cli(pool, "--json").output)
    assert report["ok"] and report["sizes_table"] == "missing" and len(report["warnings"]) == 1

    again = download(cfg(urls, pool))
    assert again["up_to_date"] is True  # nothing downloaded, only the table written
    assert table_of(pool) == EXPECTED
    mtime = (pool / "shards" / SIZES_FILE).stat().st_mtime_ns
    download(cfg(urls, pool))
    assert (pool / "shards" / SIZES_FILE).stat().st_mtime_ns == mtime  # an up-to-date table is not rewritten
    assert verify_pool(pool).warnings == []


@pytest.mark.parametrize("tamper, named", [
    (lambda t: {**t, "00000001.tar": 5}, "00000001.tar is listed with 5 samples, its metadata has 1 success rows"),
    (lambda t: {k: v for k, v in t.items() if k != "00000002.tar"}, "00000002.tar is not listed"),
    (lambda t: {**t, "00000004.tar": 2}, "00000004.tar is listed but is not a shard of this pool (4 shards)"),
])
def test_verify_fails_on_a_wrong_table_naming_the_shard(copy, tamper, named):
    _, pool = copy
    (pool / "shards" / SIZES_FILE).write_text(json.dumps(tamper(EXPECTED)))
    r = verify_cli(pool)
    assert r.exit_code == 1, r.output
    assert f"shards/{SIZES_FILE}: {named}" in r.output
    assert "disagrees with the metadata in 1 entry" in r.output and "curate download --urls" in r.output
    assert verify_pool(pool).sizes_table == "wrong"


def test_verify_lists_a_table_entry_for_a_shard_without_metadata(copy):
    _, pool = copy
    (pool / "metadata" / "00000003.parquet").unlink()
    report = verify_pool(pool)
    assert f"shards/{SIZES_FILE}: 00000003.tar is listed but shard 00000003 has no metadata" in report.problems


@pytest.mark.parametrize("content, named", [
    ("[1, 2]", "must be a JSON object"),
    ('{"00000000.tar": "2"}', "00000000.tar: sample count '2' is not a non-negative integer"),
    ('{"00000000.tar": true}', "sample count True is not a non-negative integer"),
    ('{"../x.tar": 1}', "key '../x.tar' is not a shard file name"),
    ("{not json", "not valid JSON"),
])
def test_verify_names_a_malformed_table(copy, content, named):
    _, pool = copy
    (pool / "shards" / SIZES_FILE).write_text(content)
    r = verify_cli(pool)
    assert r.exit_code == 1 and named in r.output and str(pool / "shards" / SIZES_FILE) in r.output, r.output
    assert "Traceback" not in r.output


def test_write_shard_table_validates_and_leaves_an_equal_table_alone(tmp_path):
    assert write_shard_table(tmp_path, {"00000001.tar": 3, "00000000.tar": 0}) is True
    assert (tmp_path / SIZES_FILE).read_text() == '{\n  "00000000.tar": 0,\n  "00000001.tar": 3\n}\n'
    assert write_shard_table(tmp_path, {"00000000.tar": 0, "00000001.tar": 3}) is False
    assert read_shard_table(tmp_path) == {"00000000.tar": 0, "00000001.tar": 3}
    assert read_shard_table(tmp_path / "nowhere") is None
    with pytest.raises(CurateError, match="-1"):
        write_shard_table(tmp_path, {"00000000.tar": -1})
    with pytest.raises(CurateError, match="not a shard file name"):
        write_shard_table(tmp_path, {"00000000": 1})
    assert read_shard_table(tmp_path) == {"00000000.tar": 0, "00000001.tar": 3}  # a refused table writes nothing
