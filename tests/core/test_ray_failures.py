"""curate.core.ray_failures: which Ray errors mean a dead machine, and what the message names.

A stand-in `ray` module answers `nodes()` as the GCS would; the errors are Ray's own classes. The real
crashes (a worker, an actor and a node SIGKILLed on a two-node cluster) are in tests/reliability/test_ray_chaos.py.
"""

from __future__ import annotations

import pytest

rex = pytest.importorskip("ray.exceptions")

from curate.core.errors import MachineFailure, environment_error  # noqa: E402
from curate.core.ray_failures import describe, is_system_failure, live_nodes, machine_failure  # noqa: E402


class FakeRay:
    def __init__(self, nodes):
        self._nodes = nodes

    def nodes(self):
        if isinstance(self._nodes, Exception):
            raise self._nodes
        return self._nodes


BEFORE = {"aaa": "10.0.0.3", "bbbb": "10.0.0.4"}  # the live nodes when the stage started


def _node(i: str, alive: bool = True) -> dict:
    return {"NodeID": i, "NodeManagerAddress": BEFORE[i], "Alive": alive}


def test_system_failures_are_dead_processes_or_nodes_not_raised_errors():
    assert is_system_failure(rex.WorkerCrashedError())
    assert is_system_failure(rex.ActorDiedError())
    assert is_system_failure(rex.NodeDiedError("node gone"))
    assert is_system_failure(rex.LocalRayletDiedError())
    assert not is_system_failure(rex.RayActorError(actor_init_failed=True))  # its constructor raised
    assert not is_system_failure(rex.RayTaskError("run_shard", "Traceback ...", ValueError("bug")))
    assert not is_system_failure(ValueError("not ray"))


def test_live_nodes_skips_dead_ones_and_survives_an_unreachable_cluster():
    assert live_nodes(FakeRay([_node("aaa"), _node("bbbb", alive=False)])) == {"aaa": "10.0.0.3"}
    assert live_nodes(FakeRay(ConnectionError("gcs gone"))) == {}


def test_message_names_the_node_that_died():
    ray = FakeRay([_node("aaa"), _node("bbbb", alive=False)])
    text = describe(ray, rex.WorkerCrashedError(), BEFORE)
    assert text.startswith("Ray node bbbb at 10.0.0.4 died (WorkerCrashedError: ")
    text = describe(ray, rex.ActorDiedError(), BEFORE, on_node="bbbb")
    assert text.startswith("it ran on Ray node bbbb at 10.0.0.4, which has died (ActorDiedError: ")


def test_message_when_no_node_is_reported_dead_or_the_cluster_is_gone():
    alive = FakeRay([_node("aaa"), _node("bbbb")])
    text = describe(alive, rex.ActorDiedError(), BEFORE, on_node="aaa")
    assert text.startswith("it ran on Ray node aaa at 10.0.0.3; no node is reported dead (yet): the worker "
                           "process died")
    assert "cluster could not be reached" in describe(FakeRay(ConnectionError("x")), rex.WorkerCrashedError(),
                                                      BEFORE)


def test_machine_failure_is_reported_by_the_cli_as_a_machine_failure():
    err = machine_failure(FakeRay([_node("aaa")]), rex.WorkerCrashedError(), "download of shard 3", BEFORE)
    assert isinstance(err, MachineFailure) and err.exit_code == 2
    assert err.message.startswith("download of shard 3 failed: Ray node bbbb at 10.0.0.4 died")
    assert "rerun the same command" in err.message
    assert environment_error(err) is err
