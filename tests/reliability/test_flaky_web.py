"""A flaky web: `curate download` against `curate pool serve`'s seeded fault routes, row by row.

Every fault of curate.pool.serve.FAULTS (the one fault -> expected table, also in docs/RELIABILITY.md)
is served behind `/_fault/<kind>/<seed>/<n>/<path>` with 1-second client timeouts. The test asserts, for
each row: its status after the first run, its failure class in `error_message` (transient / permanent),
and that `--retry-failed` requests again only the transient rows (the server's request log shows no
new request for a permanent one) until every transient row is a success.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.pool.download import (
    PERMANENT, PERMANENT_PREFIX, TRANSIENT, TRANSIENT_PREFIX, DownloadConfig, classify_failure, download,
    failure_class, failure_classes, summary_table,
)
from curate.pool.serve import FAULTS, fault_path, fault_plan, running_server
from curate.pool.verify import verify_pool
from tests.reliability.helpers import temp_files

TIMEOUT = 1.0  # the client's whole-request timeout
STALL = 2.0  # a stalled request answers nothing for this long: past TIMEOUT
TRICKLE = 1.6  # a trickled body takes this long: past TIMEOUT, while each piece comes well within it
MAX_N = 2  # transient bursts last 1 or 2 requests, so 2 retry runs must recover every transient row


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (40 * seed % 256, 90, 200)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def cfg(urls: Path, out: Path, **kw) -> DownloadConfig:
    base = dict(distributor="multiprocessing", processes=1, threads=32, timeout=TIMEOUT, retries=0, shard_size=12,
                image_size=16, progress=False, echo=False, allow_loopback=True)  # the loopback test server
    return DownloadConfig(urls=urls, out=out, **{**base, **kw})


def read_meta(pool: Path) -> dict[str, dict]:
    """Pool metadata rows by caption (each caption names its row)."""
    return {r["text"]: r for r in pq.read_table(pool / "metadata").to_pylist()}


def test_the_fault_table_is_complete_and_consistent():
    assert set(FAULTS) == {"none", "burst_5xx", "rate_limit_429", "reset", "stall", "trickle", "wrong_type",
                           "redirect_loop", "not_found", "gone", "not_image"}
    assert (TRANSIENT, PERMANENT) == ("transient", "permanent")
    for f in FAULTS.values():
        assert f.failure in (None, TRANSIENT, PERMANENT)
        if f.failure is None:
            assert f.first == f.final == "success"
        elif f.failure == TRANSIENT:
            assert f.first != "success" and f.final == "success"
        else:
            assert f.first == f.final != "success"
    plan = fault_plan(3, 2 * len(FAULTS), max_n=MAX_N)
    assert plan == fault_plan(3, 2 * len(FAULTS), max_n=MAX_N) != fault_plan(4, 2 * len(FAULTS), max_n=MAX_N)
    assert Counter(k for k, _, _ in plan) == {k: 2 for k in FAULTS}


def test_flaky_web_outcomes_row_by_row_and_retry_only_transient(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    for i in range(3):
        (www / f"img{i}.jpg").write_bytes(_jpeg(i))
    plan = fault_plan(seed=21, rows=3 * len(FAULTS), max_n=MAX_N)
    log: list[dict] = []
    with running_server(tmp_path, port=0, stall_seconds=STALL, trickle_seconds=TRICKLE, request_log=log) as base:
        rows = []
        for i, (kind, seed, n) in enumerate(plan):
            # a query string per row: the server counts requests per exact target, so rows never share a burst
            rows.append({"url": base + fault_path(kind, seed, n, f"img{i % 3}.jpg") + f"?row={i}",
                         "text": f"row {i} {kind}", "kind": kind, "n": n})
        pq.write_table(pa.table({"url": [r["url"] for r in rows], "text": [r["text"] for r in rows]}),
                       tmp_path / "urls.parquet")
        urls, pool = tmp_path / "urls.parquet", tmp_path / "pool"

        def requests_by_row() -> Counter:
            return Counter(e["path"] for e in list(log))

        first = download(cfg(urls, pool))
        assert first["state"] == "complete"
        meta = read_meta(pool)
        seen = requests_by_row()
        for r in rows:
            m, f = meta[r["text"]], FAULTS[r["kind"]]
            target = r["url"][len(base):]
            assert m["status"] == f.first, (r, m["error_message"])
            assert failure_class(m["status"], m["error_message"]) == f.failure, (r, m["error_message"])
            if f.failure is None:
                assert m["error_message"] is None
            else:
                assert m["error_message"].startswith(TRANSIENT_PREFIX if f.transient else PERMANENT_PREFIX)
            # one request per row (no in-run retries), except a redirect loop, which follows its own hops
            assert seen[target] == 1 or (r["kind"] == "redirect_loop" and seen[target] > 1), (r, seen[target])
        # the expected outcome is the same for every row of a kind, whatever its seed
        assert {r["kind"] for r in rows} == set(FAULTS)
        classes = failure_classes(pool, first["shards"])
        assert classes == Counter(FAULTS[r["kind"]].failure for r in rows if FAULTS[r["kind"]].failure)
        assert f"failed rows: {classes[TRANSIENT]} transient" in summary_table(first, first["runs"][-1], classes)

        permanent_targets = {r["url"][len(base):] for r in rows if FAULTS[r["kind"]].failure == PERMANENT}
        after_first = {t: seen[t] for t in permanent_targets}
        for attempt in range(1, MAX_N + 1):
            before = requests_by_row()
            download(cfg(urls, pool, retry_failed=True))
            meta, now = read_meta(pool), requests_by_row()
            for r in rows:
                m, f, target = meta[r["text"]], FAULTS[r["kind"]], r["url"][len(base):]
                new_requests = now[target] - before[target]
                if f.transient and r["n"] >= attempt:  # still failing before this run: requested again once
                    assert new_requests == 1, (r, attempt)
                    expected = "success" if r["n"] == attempt else f.first
                    assert m["status"] == expected, (r, attempt, m["error_message"])
                else:  # successes and permanent failures: never requested again
                    assert new_requests == 0, (r, attempt)
            assert {t: now[t] for t in permanent_targets} == after_first
        meta = read_meta(pool)
        for r in rows:
            assert meta[r["text"]]["status"] == FAULTS[r["kind"]].final, r
        n_logged = len(log)
        again = download(cfg(urls, pool, retry_failed=True))
        assert again["up_to_date"] and len(log) == n_logged  # nothing transient left: no request at all
    assert verify_pool(pool).ok and not temp_files(pool)
    counts = json.loads((pool / "pool.json").read_text())["counts"]
    want = Counter(FAULTS[r["kind"]].final for r in rows)
    assert counts == dict(want)


@pytest.mark.parametrize("err, expected", [
    (urllib.error.HTTPError("u", 503, "Service Unavailable", {}, None), TRANSIENT),
    (urllib.error.HTTPError("u", 500, "x", {}, None), TRANSIENT),
    (urllib.error.HTTPError("u", 429, "x", {}, None), TRANSIENT),
    (urllib.error.HTTPError("u", 408, "x", {}, None), TRANSIENT),
    (urllib.error.HTTPError("u", 404, "x", {}, None), PERMANENT),
    (urllib.error.HTTPError("u", 410, "x", {}, None), PERMANENT),
    (urllib.error.HTTPError("u", 403, "x", {}, None), PERMANENT),
    (urllib.error.HTTPError("u", 302, "redirect loop", {}, None), PERMANENT),
    (urllib.error.URLError(TimeoutError("timed out")), TRANSIENT),
    (urllib.error.URLError(ConnectionRefusedError(111, "refused")), TRANSIENT),
    (TimeoutError("timed out"), TRANSIENT),
    (ConnectionResetError(104, "reset"), TRANSIENT),
    (http.client.RemoteDisconnected("closed"), TRANSIENT),
    (http.client.IncompleteRead(b"x", 10), TRANSIENT),
    (socket.gaierror(socket.EAI_AGAIN, "temporary failure"), TRANSIENT),
    (socket.gaierror(socket.EAI_NONAME, "name not known"), PERMANENT),
    (urllib.error.URLError("unknown url type: ftp"), PERMANENT),
    (ssl.SSLCertVerificationError("certificate verify failed"), PERMANENT),
    (ValueError("bad url"), PERMANENT),
])
def test_classify_failure(err, expected):
    assert classify_failure(err) == expected


def test_serve_cli_writes_its_request_log(tmp_path):
    """`curate pool serve --request-log FILE` records every request (fault routes included) when stopped."""
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "a.jpg").write_bytes(_jpeg(1))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_file = tmp_path / "requests.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "curate.cli", "pool", "serve", str(tmp_path), "--port", str(port),
                             "--request-log", str(log_file)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                urllib.request.urlopen(base + "/a.jpg", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + fault_path("burst_5xx", 0, 1, "a.jpg"), timeout=5)
        assert e.value.code in (500, 502, 503, 504)
        assert urllib.request.urlopen(base + fault_path("burst_5xx", 0, 1, "a.jpg"), timeout=5).read() == _jpeg(1)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + fault_path("gone", 0, 1, "a.jpg"), timeout=5)
        assert e.value.code == 410
        r = urllib.request.urlopen(base + fault_path("wrong_type", 0, 1, "a.jpg"), timeout=5)
        assert r.headers["Content-Type"].startswith("text/html") and r.read() == _jpeg(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    lines = [json.loads(x) for x in log_file.read_text().splitlines()]
    faults = [x["fault"] for x in lines if x["fault"]]
    assert faults == ["burst_5xx", "burst_5xx", "gone", "wrong_type"]
    assert all(x["method"] == "GET" for x in lines) and lines[-1]["path"] == fault_path("wrong_type", 0, 1, "a.jpg")


def test_in_run_retries_repeat_only_transient_failures(tmp_path):
    """`--retries 2`: a 2-request 503 burst and a stall recover within the first run; a 404 and a redirect
    loop are requested once (img2dataset's own retry loop would request them three times)."""
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "a.jpg").write_bytes(_jpeg(2))
    log: list[dict] = []
    with running_server(tmp_path, port=0, stall_seconds=STALL, request_log=log) as base:
        kinds = [("burst_5xx", 2), ("stall", 1), ("not_found", 1), ("redirect_loop", 1), ("not_image", 1)]
        urls = [base + fault_path(k, 5, n, "a.jpg") for k, n in kinds]
        pq.write_table(pa.table({"url": urls, "text": [k for k, _ in kinds]}), tmp_path / "urls.parquet")
        download(cfg(tmp_path / "urls.parquet", tmp_path / "pool", retries=2))
        meta = read_meta(tmp_path / "pool")
        hits = Counter(e["path"] for e in log)
    assert meta["burst_5xx"]["status"] == meta["stall"]["status"] == "success"
    assert hits[urls[0][len(base):]] == 3 and hits[urls[1][len(base):]] == 2
    assert meta["not_found"]["status"] == "failed_to_download" and hits[urls[2][len(base):]] == 1
    loop = hits[urls[3][len(base):]]
    assert meta["redirect_loop"]["status"] == "failed_to_download" and 1 < loop <= 6  # one attempt: its own hops
    assert meta["not_image"]["status"] == "failed_to_resize" and hits[urls[4][len(base):]] == 1
