"""Chaos on Ray: a worker or a whole node of a two-node Ray cluster dies mid-shard, and no data is lost.

One local cluster per module (a head and a second node, both on 127.0.0.1, one CPU each, in this module's own
--temp-dir and free ports), started by the test and torn down by killing only its own processes. Every kill
lands at a progress point, never at a fraction of a timed run:
- download: a loopback server of this module (`_Gate`) holds the first request(s) of chosen URLs until the test
  lets it go, so that shard's task is known to be in flight; the worker holding the connection is found by its
  socket (/proc/net/tcp) among the cluster's processes and must be a `ray::run_shard` worker;
- embed: an injected sitecustomize (on the cluster's PYTHONPATH only, no hook in product code) makes the first
  process that opens the chosen shard's tar write its pid and wait, so that shard's embed actor is mid-shard.
Outputs are compared with an uninterrupted run: sorted metadata tables and every tar member for pools, bytes
for embeddings parquet files; `curate pool verify` accounts for every uid.

Cost: about 2.5 minutes for the file on 2 shared cores (cluster start ~20 s, each CLI run on Ray 10-20 s).
"""

from __future__ import annotations

import io
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.reliability.helpers import sorted_table, temp_files
from tests.ray_factory import alive as _alive
from tests.ray_factory import cmdline as _cmdline
from tests.ray_factory import descendants as _descendants
from tests.ray_factory import free_port as _free_port
from tests.ray_factory import kill_own as _kill_own
from tests.ray_factory import node_flags as _node_flags
from tests.ray_factory import parents as _parents
from tests.ray_factory import ray_start as _ray

pytest.importorskip("ray")

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

REPO = Path(__file__).resolve().parents[2]
WAIT = 180  # seconds: only a safety net for a loaded machine; every wait below ends on an event
N_ROWS, SHARD_SIZE = 16, 4  # 4 download shards


# ------------------------------------------------------------------------------------------------
# the cluster


def _kill_and_wait(pid: int, sig: int = signal.SIGKILL, timeout: float = 60) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    _wait_gone(pid, timeout)


def _wait_gone(pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        assert time.monotonic() < deadline, f"process {pid} ({_cmdline(pid)[:200]}) is still alive"
        time.sleep(0.02)


def _socket_inodes(local_port: int, remote_port: int) -> set[str]:
    """Inodes of the loopback TCP sockets from `local_port` to `remote_port` (/proc/net/tcp, tcp6)."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == local_port and int(f[2].rsplit(":", 1)[1], 16) == remote_port:
                out.add(f[9])
    return out


# Injected into every process of the test cluster (its PYTHONPATH). Inert unless $CURATE_CHAOS_DIR/hold exists
# and lists files (one a line): the first process to open one of them writes "pid ppid" to
# $CURATE_CHAOS_DIR/reached-<file name> and waits for $CURATE_CHAOS_DIR/go. An audit hook, so nothing of curate
# is patched.
HOLD_HOOK = '''
import os, sys, time
_chaos = os.environ.get("CURATE_CHAOS_DIR")
if _chaos:
    def _curate_chaos_hook(event, args):
        if event != "open" or not args:
            return
        try:
            path = os.fspath(args[0])
        except TypeError:
            return
        if not isinstance(path, str) or not path.endswith(".tar"):
            return
        try:
            with open(os.path.join(_chaos, "hold")) as f:
                held = f.read().split()
        except OSError:
            return
        if os.path.abspath(path) not in held:
            return
        try:
            marker = os.path.join(_chaos, "reached-" + os.path.basename(path))
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return  # held once already: the retry goes through
        os.write(fd, f"{os.getpid()} {os.getppid()}".encode())
        os.close(fd)
        deadline = time.monotonic() + 300
        while not os.path.exists(os.path.join(_chaos, "go")) and time.monotonic() < deadline:
            time.sleep(0.02)
    sys.addaudithook(_curate_chaos_hook)
'''


@dataclass
class Cluster:
    address: str
    temp_dir: str
    port: int
    env: dict
    chaos_dir: Path
    head_raylet: int
    node2_raylet: int
    node2_id: str
    head_id: str = ""

    def raylets(self) -> list[int]:
        """The live raylet processes of this cluster (found by its --temp-dir, so never another user's)."""
        return [p for p in _parents() if _alive(p) and "raylet/raylet" in (c := _cmdline(p))
                and f"--temp_dir={self.temp_dir}" in c]

    def workers(self) -> set[int]:
        """Every live descendant of this cluster's raylets (Ray workers and their children)."""
        return {p for p in _descendants(set(self.raylets())) if _alive(p)}

    def ensure_second_node(self) -> None:
        """Start the second node again if a test killed it (its raylet pid and node id change)."""
        if self.node2_raylet and _alive(self.node2_raylet):
            return
        _ray(self.env, f"--address={self.address}", *_node_flags())
        (node2,) = [r for r in self.raylets() if r != self.head_raylet]
        args = _cmdline(node2).split()
        assert "--head" not in args
        self.node2_raylet = node2
        self.node2_id = next(a.split("=", 1)[1] for a in args if a.startswith("--node_id="))

    def node_id_of(self, pid: int) -> str:
        """The Ray node id of the node `pid` runs on."""
        return {self.head_raylet: self.head_id, self.node2_raylet: self.node2_id}[self.node_of(pid)]

    def node_of(self, pid: int) -> int | None:
        """The pid of the raylet `pid` descends from (the node it runs on), or None if it is not ours."""
        parents, raylets = _parents(), set(self.raylets())
        while pid in parents and pid not in raylets:
            pid = parents[pid]
        return pid if pid in raylets else None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    chaos_dir = tmp_path_factory.mktemp("chaos")
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(HOLD_HOOK)
    port = _free_port()
    temp_dir = f"/tmp/ray_chaos_{os.getpid()}_{port}"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": f"{site}{os.pathsep}{REPO}",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "CURATE_CHAOS_DIR": str(chaos_dir),
           # a dead node is noticed after ~5 failed health checks 1 s apart (Ray's default is ~15-30 s)
           "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "5000",
           "RAY_health_check_failure_threshold": "5"}
    markers = [temp_dir, f"127.0.0.1:{port}"]
    try:
        _ray(env, "--head", f"--port={port}", "--include-dashboard=false", f"--dashboard-port={_free_port()}",
             f"--temp-dir={temp_dir}", f"--ray-client-server-port={_free_port()}", *_node_flags())
        c = Cluster(address=f"127.0.0.1:{port}", temp_dir=temp_dir, port=port, env=env, chaos_dir=chaos_dir,
                    head_raylet=0, node2_raylet=0, node2_id="")
        (c.head_raylet,) = c.raylets()
        args = _cmdline(c.head_raylet).split()
        assert "--head" in args
        c.head_id = next(a.split("=", 1)[1] for a in args if a.startswith("--node_id="))
        c.ensure_second_node()
        yield c
    finally:
        _kill_own(markers)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "curate.cli", *args]


def _wait_for(what: str, ready, proc: subprocess.Popen, timeout: float = WAIT):
    """Poll `ready()` until it returns something truthy; fail (with the CLI's output) if the CLI ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = ready()
        if got:
            return got
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the CLI ended (rc {proc.returncode}) before {what}:\n{out[-2000:]}\n{err[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, err = proc.communicate(timeout=WAIT)
    return proc.returncode, out + err


# ------------------------------------------------------------------------------------------------
# download: a loopback server that holds chosen requests


def _png(seed: int) -> bytes:
    from PIL import Image

    a = (np.random.RandomState(seed).rand(24, 40, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


class _Gate:
    """Serves /img<i>.png (and 404 for anything else). While armed, the first `hold[name]` requests for a name
    are answered only after `release` is set; every held arrival is reported with the client's port."""

    def __init__(self):
        self.images = {f"img{i}.png": _png(i) for i in range(N_ROWS)}
        self.requests: Counter = Counter()
        self.arrivals: queue.Queue = queue.Queue()
        self.hold: dict[str, int] = {}
        self.release = threading.Event()
        self.lock = threading.Lock()
        gate = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):  # noqa: N802
                name = self.path.lstrip("/")
                with gate.lock:
                    gate.requests[name] += 1
                    nth = gate.requests[name]
                if nth <= gate.hold.get(name, 0) and not gate.release.is_set():
                    gate.arrivals.put((name, self.client_address[1]))
                    gate.release.wait(WAIT)
                body = gate.images.get(name)
                try:
                    if body is None:
                        self.send_error(404)
                        return
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client was killed while held

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def arm(self, hold: dict[str, int]) -> None:
        self.requests.clear()
        self.hold = dict(hold)
        self.release.clear()
        while not self.arrivals.empty():
            self.arrivals.get_nowait()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def client_pid(self, cluster: Cluster, client_port: int) -> int:
        """The pid of the cluster process holding the connection from `client_port` to this server."""
        inodes = {f"socket:[{i}]" for i in _socket_inodes(client_port, self.port)}
        for pid in cluster.workers():
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                        return pid
                except OSError:
                    continue
        raise AssertionError(f"no process of the test cluster holds the connection from port {client_port}")


@pytest.fixture(scope="module")
def gate():
    g = _Gate()
    yield g
    g.release.set()
    g.server.shutdown()
    g.server.server_close()


@pytest.fixture(scope="module")
def download_case(tmp_path_factory, gate):
    """The URL table (16 images + a 404 row, shards of 4) and an uninterrupted reference pool."""
    from curate.pool.download import DownloadConfig, download

    root = tmp_path_factory.mktemp("dl")
    urls = root / "urls.parquet"
    names = [f"img{i}.png" for i in range(N_ROWS - 1)] + ["missing.png"]
    pq.write_table(pa.table({"url": [gate.url(n) for n in names], "text": [f"caption {i}" for i in range(N_ROWS)]}),
                   urls)
    gate.arm({})
    ref = root / "ref"
    download(DownloadConfig(urls=urls, out=ref, distributor="multiprocessing", processes=1, threads=4,
                            timeout=60.0, shard_size=SHARD_SIZE, image_size=32, allow_loopback=True, echo=False))
    return urls, names, ref


def _download_cmd(urls: Path, out: Path, cluster: Cluster) -> list[str]:
    # --timeout is far above the hold: a held request is ended by the kill, never by the timeout
    return _cli("download", "--urls", str(urls), "--out", str(out), "--ray-address", cluster.address,
                "--shard-size", str(SHARD_SIZE), "--image-size", "32", "--threads", "4", "--timeout", "60",
                "--allow-loopback", "--no-progress")


def _read_pool(pool: Path) -> tuple[pa.Table, dict[str, bytes]]:
    import tarfile

    meta = pa.concat_tables([sorted_table(p, ["key"]).replace_schema_metadata(None)
                             for p in sorted((pool / "metadata").glob("*.parquet"))]).sort_by("key")
    members = {}
    for t in sorted((pool / "shards").glob("*.tar")):
        with tarfile.open(t) as tf:
            for m in tf:
                members[f"{t.stem}/{m.name}"] = tf.extractfile(m).read()
    return meta, members


def _assert_same_pool(pool: Path, ref: Path, cluster: Cluster) -> None:
    meta, tars = _read_pool(pool)
    meta_ref, tars_ref = _read_pool(ref)
    assert meta.equals(meta_ref)
    assert tars == tars_ref
    assert json.loads((pool / "pool.json").read_text())["state"] == "complete"
    assert not temp_files(pool) and not (pool / "_staging").exists()
    r = subprocess.run(_cli("pool", "verify", str(pool)), env=cluster.env, capture_output=True, text=True,
                       timeout=WAIT)
    assert r.returncode == 0, r.stdout + r.stderr  # every uid accounted for, tars match metadata


def test_download_worker_killed_mid_shard_task_retries_and_run_completes(tmp_path, cluster, gate, download_case):
    cluster.ensure_second_node()
    urls, names, ref = download_case
    held = names[2 * SHARD_SIZE]  # shard 2's first row: dispatched only after shard 0 or 1 finished
    gate.arm({held: 1})
    pool = tmp_path / "pool"
    proc = subprocess.Popen(_download_cmd(urls, pool, cluster), env=cluster.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        name, client_port = _wait_for("the held request arrives", lambda: _poll(gate.arrivals), proc)
        assert name == held
        pid = gate.client_pid(cluster, client_port)
        assert _cmdline(pid).startswith("ray::run_shard"), _cmdline(pid)  # a Ray worker running our task
        assert cluster.node_of(pid) in (cluster.head_raylet, cluster.node2_raylet)
        _kill_and_wait(pid)
        gate.release.set()
        rc, out = _finish(proc)
    finally:
        gate.release.set()
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, out[-4000:]  # no rerun: Ray retried the task
    assert gate.requests[held] == 2  # the killed attempt and the retry
    _assert_same_pool(pool, ref, cluster)


def test_download_worker_killed_on_every_attempt_is_a_clear_error_and_a_rerun_completes(
        tmp_path, cluster, gate, download_case):
    from curate.pool.download import RAY_TASK_RETRIES
    cluster.ensure_second_node()

    urls, names, ref = download_case
    held = names[SHARD_SIZE + 1]  # a row of shard 1
    attempts = RAY_TASK_RETRIES + 1
    gate.arm({held: attempts})
    pool = tmp_path / "pool"
    proc = subprocess.Popen(_download_cmd(urls, pool, cluster), env=cluster.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(attempts):  # each attempt of the task is killed while it holds the row's request
            name, client_port = _wait_for("the held request arrives", lambda: _poll(gate.arrivals), proc)
            pid = gate.client_pid(cluster, client_port)
            assert name == held and _cmdline(pid).startswith("ray::run_shard")
            _kill_and_wait(pid)
        rc, out = _finish(proc)
    finally:
        gate.release.set()
        if proc.poll() is None:
            proc.kill()
    assert rc == 2 and "Traceback" not in out, out[-4000:]
    assert f"download of shard 1 (tried {attempts} times) failed" in out
    assert "no node is reported dead (yet): the worker process died" in out and "rerun the same command" in out
    assert json.loads((pool / "pool.json").read_text())["state"] == "in_progress"
    assert not (pool / "metadata" / "00000001.parquet").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in (pool / "metadata").glob("*.parquet")}
    r = subprocess.run(_download_cmd(urls, pool, cluster), env=cluster.env, capture_output=True, text=True,
                       timeout=WAIT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert {n: (pool / "metadata" / n).stat().st_mtime_ns for n in kept} == kept  # finished shards not redone
    _assert_same_pool(pool, ref, cluster)


def _poll(q: queue.Queue):
    try:
        return q.get_nowait()
    except queue.Empty:
        return None


# ------------------------------------------------------------------------------------------------
# embed: an actor killed while it holds a shard


@pytest.fixture(scope="module")
def embed_case(tmp_path_factory, cluster):
    """A 4-shard pool, a random curate-tiny checkpoint, and the embeddings of an uninterrupted run on the
    same cluster (actors use one thread each, so a killed and a clean run give byte-identical files)."""
    from tests.pool_factory import make_pool
    from tests.run_factory import random_checkpoint

    root = tmp_path_factory.mktemp("emb")
    ckpt = random_checkpoint(root / "tiny.pt", 0, "curate-tiny")
    fp = make_pool(root / "pristine", n_shards=4, per_shard=8, corrupt=1, failed=1)
    ref = root / "ref"
    shutil.copytree(fp.pool, ref)
    r = subprocess.run(_embed_cmd(ref, ckpt, cluster), env=cluster.env, capture_output=True, text=True, timeout=WAIT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return fp.pool, ckpt, ref


def _embed_cmd(pool: Path, ckpt: Path, cluster: Cluster) -> list[str]:
    return _cli("embed", "--pool", str(pool), "--model", "curate-tiny", "--pretrained", str(ckpt),
                "--batch-size", "3", "--workers", "2", "--cpus-per-worker", "1", "--ray-address", cluster.address)


def _embedding_files(pool: Path) -> dict[str, bytes]:
    return {str(p.relative_to(pool)): p.read_bytes() for p in sorted((pool / "embeddings").rglob("*.parquet"))}


def _hold(cluster: Cluster, paths: list[Path]) -> None:
    """Hold the first opener of each of `paths` (none: the hook is inert)."""
    for p in cluster.chaos_dir.iterdir():
        p.unlink()
    if paths:
        (cluster.chaos_dir / "hold").write_text("".join(f"{p.resolve()}\n" for p in paths))


def _reached(cluster: Cluster) -> dict[str, list[int]]:
    """{tar file name: [pid, ppid]} of the processes holding a tar open."""
    out = {}
    for p in cluster.chaos_dir.glob("reached-*"):
        try:
            pids = [int(x) for x in p.read_text().split()]
        except (OSError, ValueError):
            continue
        if len(pids) == 2:
            out[p.name[len("reached-"):]] = pids
    return out


def _actor_of(cluster: Cluster, pids: list[int]) -> int:
    """The opener is the actor itself or its decode (DataLoader) worker, a fork with the same title; the actor
    is the Ray worker, a child of a raylet."""
    raylets, parents = set(cluster.raylets()), _parents()
    (actor,) = [p for p in pids if parents.get(p) in raylets]
    assert _cmdline(actor).startswith("ray::_EmbedActor"), _cmdline(actor)
    return actor


def test_embed_actor_killed_mid_shard_recovers_with_identical_files(tmp_path, cluster, embed_case):
    cluster.ensure_second_node()
    pristine, ckpt, ref = embed_case
    pool = tmp_path / "pool"
    shutil.copytree(pristine, pool)
    _hold(cluster, [pool / "shards" / "00000002.tar"])
    proc = subprocess.Popen(_embed_cmd(pool, ckpt, cluster), env=cluster.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    leftovers = []
    try:
        pids = _wait_for("an actor opens shard 2's tar", lambda: _reached(cluster).get("00000002.tar"), proc)
        leftovers = [pids[0]]
        actor = _actor_of(cluster, pids)
        actor_node = cluster.node_id_of(actor)
        assert not list((pool / "embeddings").rglob("00000002.parquet"))
        _kill_and_wait(actor)
        (cluster.chaos_dir / "go").write_text("")
        rc, out = _finish(proc)
    finally:
        (cluster.chaos_dir / "go").write_text("")
        if proc.poll() is None:
            proc.kill()
        _hold(cluster, [])
        _kill_strays(leftovers)
    assert rc == 0, out[-4000:]
    assert (f"the actor embedding shard 2 died: it ran on Ray node {actor_node} at " in out
            and "no node is reported dead (yet): the worker process died" in out
            and "the shard goes to another actor (1 left)" in out), out[-4000:]
    assert "wrote 4 shard(s)" in out
    assert _embedding_files(pool) == _embedding_files(ref)
    assert not temp_files(pool / "embeddings")


def test_every_embed_actor_killed_is_a_clear_error_and_a_rerun_completes(tmp_path, cluster, embed_case):
    cluster.ensure_second_node()
    pristine, ckpt, ref = embed_case
    pool = tmp_path / "pool"
    shutil.copytree(pristine, pool)
    _hold(cluster, sorted((pool / "shards").glob("*.tar")))  # both actors stop in their first shard
    proc = subprocess.Popen(_embed_cmd(pool, ckpt, cluster), env=cluster.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    leftovers = []
    try:
        held = _wait_for("both actors open a shard", lambda: r if len(r := _reached(cluster)) == 2 else None, proc)
        leftovers = [pids[0] for pids in held.values()]
        for pids in held.values():
            _kill_and_wait(_actor_of(cluster, pids))
        (cluster.chaos_dir / "go").write_text("")
        rc, out = _finish(proc)
    finally:
        (cluster.chaos_dir / "go").write_text("")
        if proc.poll() is None:
            proc.kill()
        _hold(cluster, [])
        _kill_strays(leftovers)
    assert rc == 2 and "Traceback" not in out, out[-4000:]
    assert "every embed actor (2) died; shard(s) [0, 1, 2, 3] are not embedded" in out, out[-4000:]
    assert "rerun the same command" in out
    assert not list((pool / "embeddings").rglob("*.parquet"))
    r = subprocess.run(_embed_cmd(pool, ckpt, cluster), env=cluster.env, capture_output=True, text=True,
                       timeout=WAIT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert _embedding_files(pool) == _embedding_files(ref)
    assert not temp_files(pool / "embeddings")


def _kill_strays(pids: list[int]) -> None:
    """A decode worker orphaned by its killed actor exits on its own; make sure (it was ours: found above)."""
    for pid in pids:
        try:
            _wait_gone(pid, 15)
        except AssertionError:
            _kill_and_wait(pid)


# ------------------------------------------------------------------------------------------------
# the second node's raylet is killed while it runs an embed shard, then while it runs a download shard


def test_second_node_raylet_killed_mid_embed_names_the_node_and_recovers(tmp_path, cluster, embed_case):
    cluster.ensure_second_node()
    pristine, ckpt, ref = embed_case
    pool = tmp_path / "pool"
    shutil.copytree(pristine, pool)
    _hold(cluster, sorted((pool / "shards").glob("*.tar")))  # both actors stop in their first shard
    proc = subprocess.Popen(_embed_cmd(pool, ckpt, cluster), env=cluster.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    leftovers, node2 = [], cluster.node2_id
    try:
        def on_node2():
            for name, pids in _reached(cluster).items():
                if cluster.node_of(pids[0]) == cluster.node2_raylet:
                    return name, pids
            return None

        shard, pids = _wait_for("the second node's actor opens a shard", on_node2, proc)
        leftovers = [pids[0]]
        actor = _actor_of(cluster, pids)
        _kill_and_wait(cluster.node2_raylet)
        _wait_gone(actor)  # the actor's process ends with its raylet
        (cluster.chaos_dir / "go").write_text("")
        rc, out = _finish(proc)
    finally:
        (cluster.chaos_dir / "go").write_text("")
        if proc.poll() is None:
            proc.kill()
        _hold(cluster, [])
        _kill_strays(leftovers)
    # the head node's actor takes the dead node's shard: no rerun needed; the warning names the node
    assert rc == 0, out[-4000:]
    assert f"the actor embedding shard {int(shard[:8])} died: it ran on Ray node {node2} at " in out, out[-4000:]
    assert "wrote 4 shard(s)" in out
    assert _embedding_files(pool) == _embedding_files(ref)
    assert not temp_files(pool / "embeddings")


def test_second_node_raylet_killed_mid_download(tmp_path, cluster, gate, download_case):
    cluster.ensure_second_node()
    urls, names, ref = download_case
    firsts = {names[k * SHARD_SIZE] for k in range(N_ROWS // SHARD_SIZE)}
    gate.arm(dict.fromkeys(firsts, 1))  # every shard's first row is held: both nodes' slots fill with held shards
    pool = tmp_path / "pool"
    proc = subprocess.Popen(_download_cmd(urls, pool, cluster), env=cluster.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        on_node2 = None
        while on_node2 is None:
            name, client_port = _wait_for("a held request", lambda: _poll(gate.arrivals), proc)
            pid = gate.client_pid(cluster, client_port)
            if cluster.node_of(pid) == cluster.node2_raylet:
                on_node2, held_on_node2 = pid, name
        assert _cmdline(on_node2).startswith("ray::run_shard")
        _kill_and_wait(cluster.node2_raylet)
        _wait_gone(on_node2)  # a worker exits when its raylet is gone
        gate.release.set()
        rc, out = _finish(proc)
    finally:
        gate.release.set()
        if proc.poll() is None:
            proc.kill()
    # Ray notices the dead node and retries its task on the head node: the run completes without a rerun
    assert rc == 0, out[-4000:]
    assert gate.requests[held_on_node2] == 2  # the attempt on the dead node and the retry
    _assert_same_pool(pool, ref, cluster)
