"""The loopback pool server: serves www/ read-only, test routes, no escape from www/."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from curate.pool.serve import pool_port


@pytest.fixture
def pool_dir(tmp_path):
    www = tmp_path / "pool" / "www"
    (www / "src").mkdir(parents=True)
    (www / "src" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nfake-png-bytes")
    (www / "src" / "b.txt").write_text("hello")
    (tmp_path / "secret.txt").write_text("do not serve")
    os.symlink(tmp_path / "secret.txt", www / "src" / "link.txt")
    return tmp_path / "pool"


def raw_get(base_url: str, path: str, method: str = "GET"):
    """Send `path` verbatim (urllib would normalise `..` away), return (status, headers, body)."""
    u = urlsplit(base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def test_serves_files_with_length_and_type(serve_dir, pool_dir):
    base = serve_dir(pool_dir)
    with urllib.request.urlopen(f"{base}/src/a.png", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "image/png"
        body = r.read()
    assert body == (pool_dir / "www/src/a.png").read_bytes()
    assert int(r.headers["Content-Length"]) == len(body)
    status, headers, body = raw_get(base, "/src/b.txt", method="HEAD")
    assert status == 200 and body == b"" and headers["Content-Length"] == "5"


@pytest.mark.parametrize("path", [
    "/src/missing.png",
    "/src/",                 # directory: no listing
    "/",                     # root: no listing
    "/src/../../secret.txt",  # traversal
    "/src/%2e%2e/%2e%2e/secret.txt",  # encoded traversal
    "//etc/passwd",          # absolute path smuggled as empty component
    "/src/link.txt",         # symlink pointing outside www
    "/_redirect/x/src/a.png",
    "/_slow/nan/src/a.png",
    "/_redirect/1000/src/a.png",
])
def test_not_found_and_no_escape(serve_dir, pool_dir, path):
    base = serve_dir(pool_dir)
    status, _, body = raw_get(base, path)
    assert status == 404, path
    assert b"do not serve" not in body


def test_redirect_route_hops_then_serves(serve_dir, pool_dir):
    base = serve_dir(pool_dir)
    status, headers, _ = raw_get(base, "/_redirect/3/src/a.png")
    assert status == 302 and headers["Location"] == "/_redirect/2/src/a.png"
    status, headers, _ = raw_get(base, "/_redirect/1/src/a.png")
    assert status == 302 and headers["Location"] == "/src/a.png"
    with urllib.request.urlopen(f"{base}/_redirect/3/src/a.png", timeout=10) as r:  # follows all hops
        assert r.read() == (pool_dir / "www/src/a.png").read_bytes()
        assert r.geturl() == f"{base}/src/a.png"


def test_slow_route_sleeps_then_serves_and_times_out_clients(serve_dir, pool_dir):
    base = serve_dir(pool_dir)
    t0 = time.monotonic()
    with urllib.request.urlopen(f"{base}/_slow/0.3/src/b.txt", timeout=10) as r:
        assert r.read() == b"hello"
    assert time.monotonic() - t0 >= 0.3
    with pytest.raises((TimeoutError, socket.timeout, urllib.error.URLError)):
        urllib.request.urlopen(f"{base}/_slow/5/src/b.txt", timeout=0.5).read()


def test_pool_port_comes_from_pool_build_json(tmp_path):
    assert pool_port(tmp_path) == 8642
    (tmp_path / "pool_build.json").write_text(json.dumps({"base_url": "http://127.0.0.1:9911"}))
    assert pool_port(tmp_path) == 9911
    (tmp_path / "pool_build.json").write_text("{not json")
    assert pool_port(tmp_path) == 8642


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_and_exits_cleanly_on_sigterm(pool_dir):
    port = _free_port()
    (pool_dir / "pool_build.json").write_text(json.dumps({"base_url": f"http://127.0.0.1:{port}"}))
    proc = subprocess.Popen([sys.executable, "-m", "curate.cli", "pool", "serve", str(pool_dir)],
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        line = proc.stderr.readline()
        assert f"http://127.0.0.1:{port}" in line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/src/b.txt", timeout=10) as r:
            assert r.read() == b"hello"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_without_www_is_a_clear_error(tmp_path):
    from click.testing import CliRunner

    from curate.cli import main

    r = CliRunner().invoke(main, ["pool", "serve", str(tmp_path)])
    assert r.exit_code == 2
    assert "no www/ folder" in r.output and "build-offline" in r.output
