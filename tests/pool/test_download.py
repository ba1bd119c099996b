"""`curate download` against a real loopback HTTP server (curate.pool.serve): statuses, safety caps, resume
after SIGKILL, --retry-failed, idempotent re-runs, input checks, and a run through a two-node Ray cluster."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.pool.download import DownloadConfig, download
from curate.pool.download_input import InputColumns, read_input
from curate.core.errors import CurateError
from curate.pool.verify import verify_pool
from curate.core.uids import make_uid
from tests.pool_factory import bomb_png

REPO = Path(__file__).resolve().parents[2]
N_IMAGES = 12


def _png(seed: int, w: int = 48, h: int = 32) -> bytes:
    a = (np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def make_www(root: Path) -> None:
    www = root / "www"
    www.mkdir(parents=True, exist_ok=True)
    for i in range(N_IMAGES):
        (www / f"img{i}.png").write_bytes(_png(i))
    good = _png(99, 64, 64)
    (www / "truncated.png").write_bytes(good[: len(good) // 2])
    (www / "notimage.jpg").write_bytes(b"<html>this is not an image</html>\n" * 10)
    (www / "big.png").write_bytes(_png(7, 400, 400))  # ~480 KB, above the test's byte cap
    (www / "bomb.png").write_bytes(bomb_png(30000))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cfg(urls: Path, out: Path, **kw) -> DownloadConfig:
    base = dict(distributor="multiprocessing", processes=1, threads=16, timeout=2.0, shard_size=8,
                image_size=32, max_bytes=300_000, progress=False, echo=False, allow_loopback=True)
    base.update(kw)
    return DownloadConfig(urls=urls, out=out, **base)


def read_pool(pool: Path) -> tuple[pa.Table, dict[str, bytes]]:
    """All metadata rows (sorted by key) and every tar member's bytes (by shard/name)."""
    meta = pa.concat_tables([pq.read_table(p) for p in sorted((pool / "metadata").glob("*.parquet"))])
    meta = meta.replace_schema_metadata(None).sort_by("key")
    members = {}
    for t in sorted((pool / "shards").glob("*.tar")):
        with tarfile.open(t) as tf:
            for m in tf:
                members[f"{t.stem}/{m.name}"] = tf.extractfile(m).read()
    return meta, members


# ------------------------------------------------------------------------------------------------
# statuses against the loopback server


@pytest.fixture(scope="module")
def status_pool(tmp_path_factory):
    """One download covering every outcome; yields (pool, expected status per url tag, rows)."""
    from curate.pool.serve import running_server

    root = tmp_path_factory.mktemp("dl_status")
    make_www(root)
    refused = f"http://127.0.0.1:{free_port()}/img0.png"
    with running_server(root, port=0) as base:
        cases = [(f"{base}/img{i}.png", f"picture number {i}", "success") for i in range(N_IMAGES)]
        cases += [
            (f"{base}/missing.png", "a 404", "failed_to_download"),
            (refused, "refused", "failed_to_download"),
            (f"{base}/_slow/6/img1.png", "too slow", "failed_to_download"),
            (f"{base}/truncated.png", "truncated", "failed_to_resize"),
            (f"{base}/notimage.jpg", "not an image", "failed_to_resize"),
            (f"{base}/bomb.png", "bomb", "failed_to_resize"),
            (f"{base}/big.png", "oversized", "failed_to_download"),
            (f"{base}/_redirect/2/img2.png", "two redirects", "success"),
            (f"{base}/_redirect/9/img3.png", "nine redirects", "failed_to_download"),
            ("ftp://example.com/a.png", "ftp", "rejected_bad_url"),
            ("file:///etc/passwd", "local file", "rejected_bad_url"),
            (f"{base}/img4.png", "", "rejected_missing_field"),
            (f"{base}/img0.png", "picture number 0", "rejected_duplicate"),
        ]
        urls = root / "urls.parquet"
        pq.write_table(pa.table({"url": [c[0] for c in cases], "text": [c[1] for c in cases]}), urls)
        t0 = time.time()
        summary = download(cfg(urls, root / "pool", max_redirects=5))
        yield root / "pool", cases, summary, time.time() - t0, urls


def test_every_outcome_gets_the_right_status(status_pool):
    pool, cases, summary, seconds, _ = status_pool
    meta, _ = read_pool(pool)
    assert meta.num_rows == len(cases)
    by_uid = {r["uid"]: r for r in meta.to_pylist() if r["status"] != "rejected_duplicate"}
    for url, text, want in cases:
        if want == "rejected_duplicate":
            continue
        row = by_uid[make_uid(url, text)]
        assert row["status"] == want, (url, text, row["status"], row["error_message"])
        assert (row["error_message"] is None) == (want == "success"), row
    # the duplicate row is recorded too, under the same uid as the first one
    dup_uid = make_uid(cases[0][0], cases[0][1])
    rows = [r for r in meta.to_pylist() if r["uid"] == dup_uid]
    assert sorted(r["status"] for r in rows) == ["rejected_duplicate", "success"]
    msg = {r["text"]: r["error_message"] for r in meta.to_pylist()}
    assert "404" in msg["a 404"]
    assert "refused" in msg["refused"].lower()
    assert "timed out" in msg["too slow"].lower() or "timeout" in msg["too slow"].lower()
    assert "decompression bomb guard" in msg["bomb"] and "900000000" in msg["bomb"]
    assert "cap of 300000 bytes" in msg["oversized"]
    assert "more than 5 redirects" in msg["nine redirects"]
    assert "not http or https" in msg["ftp"] and "not http or https" in msg["local file"]
    assert summary["counts"] == dict(sorted((s, sum(c[2] == s for c in cases)) for s in {c[2] for c in cases}))
    assert summary["state"] == "complete"
    assert seconds < 60  # the 6 s slow URL is cut at the 2 s timeout, not waited for


def test_pool_layout_loads_in_pandas_duckdb_and_webdataset(status_pool):
    import duckdb
    import webdataset as wds

    pool, cases, *_ = status_pool
    con = duckdb.connect()
    counts = dict(con.sql(f"select status, count(*) from read_parquet('{pool}/metadata/*.parquet') group by 1").fetchall())
    assert sum(counts.values()) == len(cases) and counts["success"] == N_IMAGES + 1
    names = sorted(p.name for p in (pool / "shards").iterdir())
    assert names == [f"{k:08d}.tar" for k in range(len(names) - 1)] + ["sizes.json"]  # + the shard table
    meta = {r["key"]: r for r in read_pool(pool)[0].to_pylist()}
    seen = 0
    for s in wds.WebDataset([str(p) for p in sorted((pool / "shards").glob("*.tar"))], shardshuffle=False):
        j = json.loads(s["json"])
        assert j["uid"] == meta[s["__key__"]]["uid"] and meta[s["__key__"]]["status"] == "success"
        assert s["txt"].decode() == meta[s["__key__"]]["text"]
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.size == (32, 32) and j["width"] == 32
        seen += 1
    assert seen == N_IMAGES + 1
    info = json.loads((pool / "pool.json").read_text())
    assert info["input"]["rows"] == len(cases) and info["versions"]["img2dataset"]
    assert verify_pool(pool).ok


def test_rerun_is_a_no_op(status_pool):
    pool, _, _, _, urls = status_pool
    before = {p: p.stat().st_mtime_ns for p in pool.rglob("*") if p.is_file()}
    again = download(cfg(urls, pool))
    assert again["up_to_date"] is True
    assert {p: p.stat().st_mtime_ns for p in pool.rglob("*") if p.is_file()} == before


def test_changed_settings_or_input_are_refused(status_pool, tmp_path):
    pool, _, _, _, urls = status_pool
    with pytest.raises(CurateError, match="image_size"):
        download(cfg(urls, pool, image_size=64))
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:1/x.png"], "text": ["x"]}), other)
    with pytest.raises(CurateError, match="different input"):
        download(cfg(other, pool))


# ------------------------------------------------------------------------------------------------
# retry-failed, resume after SIGKILL


def test_retry_failed_recovers_rows_whose_url_starts_working(tmp_path, serve_dir):
    make_www(tmp_path)
    base = serve_dir(tmp_path)
    rows = [(f"{base}/img{i}.png", f"c{i}") for i in range(6)] + [(f"{base}/late.png", "late"), ("ftp://x/y", "ftp")]
    urls = tmp_path / "urls.csv"
    urls.write_text("url,text\n" + "".join(f"{u},{t}\n" for u, t in rows))
    pool = tmp_path / "pool"
    first = download(cfg(urls, pool, shard_size=4))
    assert first["counts"] == {"failed_to_download": 1, "rejected_bad_url": 1, "success": 6}
    meta1, members1 = read_pool(pool)
    (tmp_path / "www" / "late.png").write_bytes(_png(42))
    assert download(cfg(urls, pool, shard_size=4))["up_to_date"]  # without the flag nothing is retried
    # a 404 is a permanent failure: --retry-failed alone does not request it again
    assert download(cfg(urls, pool, shard_size=4, retry_failed=True))["up_to_date"]
    second = download(cfg(urls, pool, shard_size=4, retry_failed=True, retry_permanent=True))
    assert second["counts"] == {"rejected_bad_url": 1, "success": 7}
    meta2, members2 = read_pool(pool)
    late = [r for r in meta2.to_pylist() if r["text"] == "late"][0]
    assert late["status"] == "success" and late["key"] == "000000012"
    assert members2[f"00000001/{late['key']}.jpg"]
    # the earlier samples are untouched, and the retried row kept its key
    assert {k: v for k, v in members2.items() if "000000012" not in k} == members1
    assert meta2.filter(pa.compute.not_equal(meta2["text"], "late")).equals(
        meta1.filter(pa.compute.not_equal(meta1["text"], "late")))
    assert verify_pool(pool).ok
    assert download(cfg(urls, pool, shard_size=4, retry_failed=True, retry_permanent=True))["up_to_date"]


def test_kill_and_resume_gives_the_same_pool(tmp_path, serve_dir):
    make_www(tmp_path)
    base = serve_dir(tmp_path)
    n = 24
    urls = tmp_path / "urls.jsonl"
    urls.write_text("".join(json.dumps({"url": f"{base}/_slow/0.3/img{i % N_IMAGES}.png", "text": f"caption {i}"}) + "\n"
                            for i in range(n)))
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "curate.cli", "download", "--urls", str(urls), "--out", str(killed),
           "--shard-size", "2", "--distributor", "multiprocessing", "--processes", "1", "--threads", "2",
           "--image-size", "32", "--timeout", "5", "--allow-loopback"]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 90

    def finished() -> int:  # shards whose metadata (the completion marker) is in place; pathlib's glob
        # also matches the hidden temp file of a shard being written, which is not finished
        return sum(1 for p in (killed / "metadata").glob("*.parquet") if not p.name.startswith(".tmp-"))

    while time.time() < deadline and finished() < 3:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = finished()
    assert 3 <= done_before < n // 2, "the run was not killed part-way"
    assert json.loads((killed / "pool.json").read_text())["state"] == "in_progress"
    assert not verify_pool(killed).ok  # an unfinished pool does not pass

    resumed = download(cfg(urls, killed, shard_size=2, threads=2, timeout=5.0))
    assert resumed["runs"][-1]["shards_run"] == n // 2 - done_before  # only what was missing
    reference = download(cfg(urls, tmp_path / "reference", shard_size=2, threads=8, timeout=5.0))
    assert resumed["counts"] == reference["counts"] == {"success": n}
    meta_a, tar_a = read_pool(killed)
    meta_b, tar_b = read_pool(tmp_path / "reference")
    assert meta_a.equals(meta_b)
    assert tar_a == tar_b
    assert not list(killed.rglob(".tmp-*"))
    assert not (killed / "_staging").exists() or not any((killed / "_staging").iterdir())
    assert verify_pool(killed).ok


# ------------------------------------------------------------------------------------------------
# input reading (no network)


def test_input_formats_columns_and_given_uids(tmp_path):
    csv = tmp_path / "a.csv"
    csv.write_text('link,caption\nhttp://h/1.png,1990\nhttp://h/2.png,"two, words"\n')
    t = read_input(csv, InputColumns(url="link", text="caption")).table
    assert t["text"].to_pylist() == ["1990", "two, words"]
    assert t["uid"].to_pylist() == [make_uid("http://h/1.png", "1990"), make_uid("http://h/2.png", "two, words")]

    given = ["0" * 31 + "1", "f" * 32, "f" * 32]
    pq.write_table(pa.table({"uid": given, "url": ["http://h/1", "http://h/2", "http://h/3"], "text": ["a", "b", "c"]}),
                   tmp_path / "b.parquet")
    inp = read_input(tmp_path / "b.parquet")
    assert inp.uids_given and inp.table["uid"].to_pylist() == given
    assert inp.table["status"].to_pylist() == [None, None, "rejected_duplicate"]
    assert "same uid as row 1" in inp.table["error_message"][2].as_py()

    pq.write_table(pa.table({"uid": ["NOT-A-UID"], "url": ["http://h/1"], "text": ["a"]}), tmp_path / "c.parquet")
    with pytest.raises(CurateError, match=r"row 0 has 'uid' = 'NOT-A-UID'"):
        read_input(tmp_path / "c.parquet")


def test_input_errors_name_the_file_and_column(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(CurateError, match="empty.csv: the file is empty"):
        read_input(tmp_path / "empty.csv")
    (tmp_path / "hdr.csv").write_text("url,text\n")
    with pytest.raises(CurateError, match="hdr.csv: has no rows"):
        read_input(tmp_path / "hdr.csv")
    pq.write_table(pa.table({"url": ["http://h/1"], "caption": ["a"]}), tmp_path / "nocap.parquet")
    with pytest.raises(CurateError, match=r"nocap.parquet: missing column\(s\) 'text'.*--text-col"):
        read_input(tmp_path / "nocap.parquet")
    (tmp_path / "x.txt").write_text("http://h/1\n")
    with pytest.raises(CurateError, match="unsupported input format"):
        read_input(tmp_path / "x.txt")


def test_cli_download_help_and_bad_input(tmp_path):
    from click.testing import CliRunner

    from curate.cli import main

    r = CliRunner().invoke(main, ["download", "--help"])
    assert r.exit_code == 0 and "--retry-failed" in r.output and "--ray-address" in r.output
    assert "--allow-loopback" in r.output and "--allow-cidr" in r.output and "address guard" in r.output
    (tmp_path / "u.csv").write_text("address,text\nhttp://h/1,a\n")
    r = CliRunner().invoke(main, ["download", "--urls", str(tmp_path / "u.csv"), "--out", str(tmp_path / "p")])
    assert r.exit_code == 2 and "missing column(s) 'url'" in r.output and "Traceback" not in r.output


# ------------------------------------------------------------------------------------------------
# a two-node Ray cluster started by the test


@pytest.mark.slow
def test_two_node_ray_cluster_produces_the_same_pool(tmp_path, serve_dir):
    make_www(tmp_path)
    base = serve_dir(tmp_path)
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [f"{base}/img{i}.png" for i in range(N_IMAGES)] + [f"{base}/nope.png"],
                             "text": [f"t{i}" for i in range(N_IMAGES + 1)]}), urls)
    from tests.ray_factory import local_cluster

    with local_cluster(nodes=2) as c:  # a head and a second node, one CPU each, on 127.0.0.1
        r = subprocess.run([sys.executable, "-m", "curate.cli", "download", "--urls", str(urls), "--out",
                            str(tmp_path / "ray_pool"), "--ray-address", c.address, "--shard-size", "4",
                            "--image-size", "32", "--threads", "8", "--timeout", "5", "--allow-loopback"],
                           env=c.env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        info = json.loads((tmp_path / "ray_pool" / "pool.json").read_text())
        assert info["runs"][-1]["run_settings"]["ray_address"] == c.address
    reference = download(cfg(urls, tmp_path / "ref", shard_size=4, threads=8, timeout=5.0))
    assert reference["counts"] == {"success": N_IMAGES, "failed_to_download": 1}
    meta_a, tar_a = read_pool(tmp_path / "ray_pool")
    meta_b, tar_b = read_pool(tmp_path / "ref")
    assert meta_a.equals(meta_b) and tar_a == tar_b


# ------------------------------------------------------------------------------------------------
# the real offline pool (curate pool build-offline), whose truth.parquet says what each row should become

TRUTH_TO_STATUS = {"success": "success", "404": "failed_to_download", "truncated": "failed_to_resize",
                   "not_image": "failed_to_resize", "bomb": "failed_to_resize", "oversized": "failed_to_download"}


def test_offline_pool_rows_end_as_truth_says(offline_pool_small, tmp_path):
    # every row whose download is not plain (broken files, redirects, empty captions, exact duplicates)
    # plus 100 others; caption noise does not change what the downloader sees
    special = {"redirect", "empty_caption", "exact_dup"}
    truth = [r for i, r in enumerate(pq.read_table(offline_pool_small.truth).to_pylist())
             if r["noise"] in special or r["expected_status"] != "success" or i < 100]
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [r["url"] for r in truth], "text": [r["text"] for r in truth]}), urls)
    out = tmp_path / "pool"
    summary = download(cfg(urls, out, shard_size=200, threads=32, image_size=64, max_bytes=2_000_000,
                           timeout=10.0))
    meta = {r["uid"]: r for r in read_pool(out)[0].to_pylist()}
    assert sum(summary["counts"].values()) == len(truth) == len(meta)  # uids are unique in this pool
    wrong = []
    for t in truth:
        got = meta[t["uid"]]
        want = "rejected_missing_field" if not (t["text"] or "").strip() else TRUTH_TO_STATUS[t["expected_status"]]
        if got["status"] != want:
            wrong.append((t["noise"], t["expected_status"], got["status"], got["error_message"]))
        elif want == "success":
            assert got["sha256"] == t["sha256"] and (got["original_width"], got["original_height"]) == (t["width"], t["height"])
    assert not wrong, wrong[:10]
    assert verify_pool(out).ok
