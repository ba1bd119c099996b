"""A local multi-node Ray cluster for tests: a head and extra nodes, every one on 127.0.0.1, started with `ray start`
in a temp dir and on ports of their own, and stopped by killing only their own processes.

Why a factory: the download, reshard and Ray chaos tests each need such a cluster; `ray stop` would stop every Ray
cluster on the machine (other engineers' runs too), and Ray's default ports collide between concurrent tests, so
the start flags and the clean-up live here once. Processes are read from /proc (psutil is not a dependency of the
project; Ray's multi-node mode on one machine is Linux-only anyway).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WAIT = 180  # seconds for one `ray start`: only a safety net for a loaded machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie is dead, only not yet reaped


def parents() -> dict[int, int]:
    """{pid: parent pid} of every process."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            out[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def descendants(roots: set[int]) -> set[int]:
    tree = parents()
    found, grew = set(), True
    while grew:
        new = {p for p, pp in tree.items() if (pp in roots or pp in found) and p not in found}
        found |= new
        grew = bool(new)
    return found


def ray_start(env: dict, *args: str) -> None:
    r = subprocess.run([str(Path(sys.executable).parent / "ray"), "start", *args], env=env, capture_output=True,
                       text=True, timeout=WAIT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def node_flags(num_cpus: int = 1) -> list[str]:
    """`ray start` flags of one node: every port of ours is free and chosen here, so a concurrent Ray test on the
    machine cannot collide."""
    return ["--num-cpus", str(num_cpus), "--disable-usage-stats", "--node-ip-address=127.0.0.1",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


def cluster_env(**extra: str) -> dict:
    """The environment of a throwaway loopback cluster: no token auth (Ray 2.60 would otherwise enable it on the
    head only), no usage stats, this checkout importable."""
    return {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled", **extra}


def kill_own(markers: list[str]) -> None:
    """Stop only the processes whose command line names one of `markers` (a cluster's temp dir or GCS address),
    and their descendants."""
    ours = {p for p in parents() if p != os.getpid() and any(m in cmdline(p) for m in markers)}
    ours |= descendants(ours)
    for sig, pause in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        for p in ours:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        deadline = time.monotonic() + pause
        while time.monotonic() < deadline and any(alive(p) for p in ours):
            time.sleep(0.1)


@dataclass
class LocalCluster:
    address: str  # the head's GCS, 127.0.0.1:PORT
    temp_dir: str
    port: int
    env: dict

    @property
    def markers(self) -> list[str]:
        return [self.temp_dir, f"127.0.0.1:{self.port}"]

    def raylets(self) -> list[int]:
        """The live raylet processes of this cluster (found by its --temp-dir, so never another user's)."""
        return [p for p in parents() if alive(p) and "raylet/raylet" in (c := cmdline(p))
                and f"--temp_dir={self.temp_dir}" in c]

    def add_node(self, num_cpus: int = 1) -> None:
        ray_start(self.env, f"--address={self.address}", *node_flags(num_cpus))


@contextlib.contextmanager
def local_cluster(nodes: int = 2, num_cpus: int = 1, env: dict | None = None, name: str = "ray_curate"):
    """A cluster of `nodes` nodes (the head and nodes - 1 more) of `num_cpus` CPUs each; torn down on exit."""
    port = free_port()
    temp_dir = f"/tmp/{name}_{os.getpid()}_{port}"
    c = LocalCluster(address=f"127.0.0.1:{port}", temp_dir=temp_dir, port=port, env=env or cluster_env())
    try:
        ray_start(c.env, "--head", f"--port={port}", "--include-dashboard=false", f"--dashboard-port={free_port()}",
                  f"--temp-dir={temp_dir}", f"--ray-client-server-port={free_port()}", *node_flags(num_cpus))
        for _ in range(nodes - 1):
            c.add_node(num_cpus)
        yield c
    finally:
        kill_own(c.markers)
        shutil.rmtree(temp_dir, ignore_errors=True)
