"""Ray's system failures (a worker process, an actor or a whole node that died) as one MachineFailure.

Why: Ray reports a dead machine under several exception types (WorkerCrashedError, NodeDiedError,
ActorDiedError, ...) whose long messages differ between versions and rarely say which node was lost. A user
needs the node, what was lost (nothing: finished shards are kept) and that a rerun resumes. The stages take a
snapshot of the cluster's live nodes when they start (`live_nodes`) and name the ones gone by the time of the
failure. `ray` is imported lazily: only the Ray code paths of the stages call this module.
"""

from __future__ import annotations

from curate.core.errors import RESUME, MachineFailure

# the ray.exceptions classes that mean "a machine or a process died", not "the task raised"
_SYSTEM_FAILURES = ("WorkerCrashedError", "NodeDiedError", "RayActorError", "LocalRayletDiedError",
                    "ObjectLostError", "OutOfMemoryError", "RaySystemError")


def is_system_failure(err: BaseException) -> bool:
    """True when `err` says a Ray worker, actor or node died. An actor whose constructor raised is not one
    (that is the constructor's own error: a bad checkpoint, a bug), nor is a task that raised."""
    import ray.exceptions as rex

    classes = tuple(c for c in (getattr(rex, n, None) for n in _SYSTEM_FAILURES) if isinstance(c, type))
    if not isinstance(err, classes):
        return False
    return not getattr(err, "actor_init_failed", False)


def live_nodes(ray) -> dict[str, str]:
    """{node id: address} of the nodes alive now (`ray` is the initialised ray module)."""
    try:
        return {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("Alive")}
    except Exception:  # noqa: BLE001 - the GCS may be gone too; the message then says so
        return {}


def describe(ray, err: BaseException, before: dict[str, str], on_node: str | None = None) -> str:
    """What died, for a message: the node the work ran on (`on_node`, when the caller knows it), the nodes of
    `before` (a `live_nodes` snapshot) no longer alive, and Ray's own first line. Ray notices a dead node only
    after its health checks fail (seconds), so right after a crash a dead node may still be listed alive."""
    now = live_nodes(ray)
    lost = {k: v for k, v in before.items() if k not in now} if now else {}
    first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
    parts = []
    if on_node:
        parts.append(f"it ran on Ray node {on_node} at {before.get(on_node, now.get(on_node, '?'))}"
                     + (", which has died" if on_node in lost else ""))
    others = {k: v for k, v in lost.items() if k != on_node}
    if others:
        parts.append("; ".join(f"Ray node {k} at {v} died" for k, v in sorted(others.items())))
    elif not now and before:
        parts.append("the Ray cluster could not be reached (its head node may be gone)")
    elif not lost:
        parts.append("no node is reported dead (yet): the worker process died (the out-of-memory killer, a crash "
                     "in a native library, a kill) or its node is going down")
    return f"{'; '.join(parts)} ({type(err).__name__}: {first[:300]})"


def machine_failure(ray, err: BaseException, what: str, before: dict[str, str],
                    on_node: str | None = None) -> MachineFailure:
    """A MachineFailure for `err` while doing `what` (e.g. "download of shard 3"), naming what died."""
    return MachineFailure(f"{what} failed: {describe(ray, err, before, on_node)}. {RESUME}")
