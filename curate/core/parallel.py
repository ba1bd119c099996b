"""One bounded-parallel map for every stage: in this process, in a pool of processes, or on a Ray cluster.

Why one: download, embed, the filter engine, reshard and the offline pool builder each had their own Ray driver or
process pool, each with its own in-flight bound, its own `ray.init` and its own way of reporting a dead worker, and
reshard could not run on Ray at all. Here:

* `Backend` says where tasks run: "local" (this process, one after another: no start-up cost, errors as they
  are), "process" (a `ProcessPoolExecutor` started by spawn or forkserver, never fork: the callers hold threads,
  e.g. DuckDB's or a test server's, that a fork would copy half-held), "ray" (Ray tasks on the cluster at
  `ray_address`; "local" or None starts one in this process). `Backend.choose` maps the shared `--workers` /
  `--ray-address` flags onto one of them.
* `Resources` is what one task needs (CPUs, GPUs, memory); Ray schedules by it, and the number of tasks in
  flight on a cluster defaults to the cluster's CPUs divided by the task's.
* `pmap(fn, items)` calls `fn(item, *args)` for every item with at most `in_flight` tasks submitted at a time, so
  memory stays bounded whatever the number of items, and yields `(item, result)` in input order (`ordered`) or
  as tasks finish. A per-worker state (a filter instance, a model) is built once per worker process by
  `initializer(*initargs)`, as `ProcessPoolExecutor`'s initializer does, on Ray too.
* `actor_map` runs Ray actors that each build an expensive state once (a model) and pull items; an actor that
  dies hands its item back to the survivors (the embed stage).
* Failures name the item: a task that raised re-raises its own exception with a note saying which item it was;
  a worker process, Ray worker or Ray node that died is a `MachineFailure` naming the item and what died
  (`curate.core.ray_failures`), after Ray's `retries`.
* `ray_session` is the only `ray.init` of the project (tests/test_layout.py enforces it, and that no
  `ProcessPoolExecutor` or `multiprocessing.Pool` is made outside this module).

`ray` is imported lazily: only the Ray backends import it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from curate.core.errors import RESUME, MachineFailure, MissingDependencyError

BACKENDS = ("local", "process", "ray")
START_METHODS = ("spawn", "forkserver")
_REPO = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True)
class Resources:
    """What one task (or actor) needs. Ray reserves it on a node; a process pool runs one task per process."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory: int | None = None  # bytes; Ray will not place a task on a node with less free memory

    def ray_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.cpus}
        if self.gpus:
            opts["num_gpus"] = self.gpus
        if self.memory:
            opts["memory"] = int(self.memory)
        return opts


@dataclass(frozen=True)
class Backend:
    """Where a map's tasks run. `workers`: processes of the pool (0: one per CPU core), or the most tasks in flight
    on Ray (0: the cluster's CPUs divided by the task's). `ray_env`: environment variables for Ray's workers.
    `keep_ray`: leave a Ray runtime this map started running (the filter engine maps several steps on it)."""

    kind: str = "local"
    workers: int = 0
    ray_address: str | None = None
    start_method: str = "spawn"
    ray_env: dict[str, str] = field(default_factory=dict)
    keep_ray: bool = False

    def __post_init__(self) -> None:
        if self.kind not in BACKENDS:
            raise ValueError(f"backend {self.kind!r}: expected one of {BACKENDS}")
        if self.start_method not in START_METHODS:
            raise ValueError(f"start method {self.start_method!r}: expected one of {START_METHODS} (never fork)")

    @classmethod
    def choose(cls, workers: int | None, ray_address: str | None = None, **kw: Any) -> "Backend":
        """The backend the shared flags ask for: `--ray-address` -> Ray; `--workers` > 1 -> a process pool;
        else local. `workers` 0 or None means one per CPU core."""
        if ray_address:
            return cls("ray", workers or 0, ray_address, **kw)
        n = workers or os.cpu_count() or 1
        return cls("process" if n > 1 else "local", n, None, **kw)


def import_ray():
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("ray", "pip install 'ray[default]'") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None, env_vars: dict[str, str] | None = None, keep: bool = False,
                num_cpus: int | None = None):
    """Yield the `ray` module, initialised: joined to the cluster at `address`, or a runtime started here when
    `address` is None or "local" (with `num_cpus`, default all). A runtime already initialised in this process is
    used as it is and left running. Ray's workers get `env_vars` and this checkout on their PYTHONPATH, so a
    cluster started from another folder can import curate. A runtime started here is shut down on exit unless
    `keep`."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    env = dict(env_vars or {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_REPO, env.get("PYTHONPATH", os.environ.get("PYTHONPATH"))]))
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                                  ignore_reinit_error=True, runtime_env={"env_vars": env})
    if address and address != "local":
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), **kwargs)
    try:
        yield ray
    finally:
        if not keep:
            ray.shutdown()


# ------------------------------------------------------------------------------------------------ the map


def _label(label: Callable[[Any], str] | None, item: Any, index: int) -> str:
    return label(item) if label is not None else f"item {index}"


def _noted(err: BaseException, what: str) -> BaseException:
    note = f"(while running {what})"
    if note not in getattr(err, "__notes__", ()):
        err.add_note(note)
    return err


def _worker_died(what: str, err: BaseException) -> MachineFailure:
    return MachineFailure(f"{what} failed: a worker process died ({type(err).__name__}: {str(err)[:300]}); the "
                          f"usual causes are the out-of-memory killer or a crash in a native library (see `dmesg`). "
                          f"{RESUME}")


def _drive(units: Iterator[tuple[int, Any]], submit, result, wait_one, depth: int, ordered: bool):
    """Keep at most `depth` units submitted; yield (index, unit, result) in submission order or as they finish."""
    if ordered:
        pending: deque = deque()
        for i, u in units:
            pending.append((i, u, submit(u)))
            if len(pending) >= depth:
                j, v, h = pending.popleft()
                yield j, v, result(h, j, v)
        while pending:
            j, v, h = pending.popleft()
            yield j, v, result(h, j, v)
        return
    inflight: dict = {}
    it = iter(units)
    for i, u in it:
        inflight[submit(u)] = (i, u)
        if len(inflight) >= depth:
            break
    while inflight:
        h = wait_one(list(inflight))
        i, u = inflight.pop(h)
        nxt = next(it, None)
        if nxt is not None:
            inflight[submit(nxt[1])] = nxt
        yield i, u, result(h, i, u)


def _run_chunk(fn, chunk: list, args: tuple) -> list:
    return [fn(item, *args) for item in chunk]


_STATE: dict[str, Any] = {}


def _ray_stateful(fn, initializer, initargs: tuple, key: str, item, args: tuple):
    """Ray task body for a map with an initializer: the initializer runs once per Ray worker process and map
    (`key`), as a process pool's initializer runs once per process."""
    if _STATE.get("key") != key:
        initializer(*initargs)
        _STATE["key"] = key
    return fn(item, *args)


def pmap(fn: Callable, items: Iterable, *, backend: Backend = Backend(), args: tuple = (),
         resources: Resources = Resources(), ordered: bool = True, depth: int = 2, in_flight: int | None = None,
         initializer: Callable | None = None, initargs: tuple = (), retries: int = 0,
         label: Callable[[Any], str] | None = None, chunksize: int = 1,
         max_tasks_per_child: int | None = None) -> Iterator[tuple[Any, Any]]:
    """Yield `(item, fn(item, *args))` for every item of `items` (consumed lazily), `ordered` or as finished.

    At most `in_flight` tasks are submitted at a time (default `depth` x the backend's slots: its processes, or
    on Ray the cluster's CPUs / `resources.cpus` unless `backend.workers` says). `fn`, `initializer` and the items
    must be picklable (module-level functions) for the process and Ray backends. `chunksize` > 1 sends items to a
    process pool in chunks (for many tiny tasks); `max_tasks_per_child` restarts a pool process after that many
    (a library that leaks). `retries`: Ray retries of a task whose worker or node died. `label(item)` names an
    item in errors ("download of shard 3")."""
    if backend.kind == "local":
        yield from _pmap_local(fn, items, args, initializer, initargs, label)
    elif backend.kind == "process":
        yield from _pmap_process(fn, items, backend, args, ordered, depth, in_flight, initializer, initargs, label,
                                 chunksize, max_tasks_per_child)
    else:
        yield from _pmap_ray(fn, items, backend, args, resources, ordered, depth, in_flight, initializer, initargs,
                             retries, label)


def _pmap_local(fn, items, args, initializer, initargs, label):
    if initializer is not None:
        initializer(*initargs)
    for i, item in enumerate(items):
        try:
            res = fn(item, *args)
        except Exception as e:
            raise _noted(e, _label(label, item, i))
        yield item, res


def _pmap_process(fn, items, backend, args, ordered, depth, in_flight, initializer, initargs, label, chunksize,
                  max_tasks_per_child):
    import concurrent.futures as cf
    import multiprocessing as mp
    from concurrent.futures.process import BrokenProcessPool

    workers = backend.workers or os.cpu_count() or 1
    kw: dict[str, Any] = {}
    if max_tasks_per_child:
        kw["max_tasks_per_child"] = max_tasks_per_child
    ex = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context(backend.start_method), initializer=initializer,
                                initargs=initargs, **kw)
    chunk = max(1, chunksize)

    def units():
        buf: list = []
        for i, item in enumerate(items):
            buf.append((i, item))
            if len(buf) >= chunk:
                yield buf[0][0], buf
                buf = []
        if buf:
            yield buf[0][0], buf

    def submit(unit):
        if chunk == 1:
            return ex.submit(fn, unit[0][1], *args)
        return ex.submit(_run_chunk, fn, [item for _, item in unit], args)

    def result(fut, i, unit):
        what = (_label(label, unit[0][1], i) if len(unit) == 1
                else f"one of items {unit[0][0]}..{unit[-1][0]}")
        try:
            res = fut.result()
        except BrokenProcessPool as e:
            raise _worker_died(what, e) from None
        except Exception as e:
            raise _noted(e, what)
        return [res] if chunk == 1 else res

    def wait_one(futs):
        done, _ = cf.wait(futs, return_when=cf.FIRST_COMPLETED)
        return next(iter(done))

    ok = False
    try:
        for _, unit, results in _drive(units(), submit, result, wait_one, in_flight or depth * workers, ordered):
            for (_, item), res in zip(unit, results):
                yield item, res
        ok = True
    finally:
        ex.shutdown(wait=ok, cancel_futures=not ok)


def _pmap_ray(fn, items, backend, args, resources, ordered, depth, in_flight, initializer, initargs, retries, label):
    from curate.core.ray_failures import is_system_failure, live_nodes, machine_failure

    with ray_session(backend.ray_address, backend.ray_env, keep=backend.keep_ray) as ray:
        opts = {**resources.ray_options(), "max_retries": retries}
        if initializer is None:
            remote = ray.remote(**opts)(fn)  # the worker's title stays ray::<fn> (the chaos tests find it by it)

            def submit(item):
                return remote.remote(item, *args)
        else:
            remote = ray.remote(**opts)(_ray_stateful)
            key = uuid.uuid4().hex  # one per map: a worker process that ran another map's initializer runs this one

            def submit(item):
                return remote.remote(fn, initializer, initargs, key, item, args)
        slots = backend.workers or max(1, int(ray.cluster_resources().get("CPU", 1) // max(resources.cpus, 1e-9)))
        nodes = live_nodes(ray)

        def result(ref, i, item):
            what = _label(label, item, i)
            try:
                return ray.get(ref)
            except ray.exceptions.RayError as e:
                if is_system_failure(e):
                    tried = f" (tried {retries + 1} times)" if retries else ""
                    raise machine_failure(ray, e, what + tried, nodes) from None
                raise _noted(e, what)

        def wait_one(refs):
            (ref,), _ = ray.wait(refs, num_returns=1)
            return ref

        yield from ((item, res) for _, item, res in
                    _drive(enumerate(items), submit, result, wait_one, in_flight or depth * slots, ordered))


# ------------------------------------------------------------------------------------------------ Ray actors


class RayActor:
    """Base of a class `actor_map` runs as Ray actors: it says which node it runs on, for messages."""

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def actor_map(actor_cls: type, init_args: tuple, items: list, *, workers: int, ray_address: str | None = None,
              resources: Resources = Resources(), method: str = "run", label: Callable[[Any], str] | None = None,
              on_lost: Callable[[Any, str, int], None] | None = None,
              lost_all: Callable[[list, MachineFailure], MachineFailure] | None = None) -> Iterator[tuple[Any, Any]]:
    """Run `workers` Ray actors of `actor_cls(*init_args)` (a `RayActor`; each builds its state once) and hand
    each one item at a time (`actor.<method>(item)`); yield `(item, result)` as they finish.

    An actor whose process or node dies has its item handed to the other actors, and is not replaced (its node
    may be gone, and an actor waiting for resources that never come would hang the run); `on_lost(item, what
    died, actors left)` is told. When every actor has died the unfinished items are a MachineFailure
    (`lost_all(items left, last failure)` words it). An error an actor raises (a bug, a bad input) is raised."""
    from curate.core.ray_failures import describe, is_system_failure, live_nodes, machine_failure

    with ray_session(ray_address) as ray:
        cls = ray.remote(**resources.ray_options())(actor_cls)
        nodes = live_nodes(ray)
        n = min(workers, len(items))
        idle = [cls.remote(*init_args) for _ in range(n)]
        where = {a: a.node.remote() for a in idle}  # asked once (answered before the first item) to name a node
        todo, running, failure = list(enumerate(items)), {}, None
        while todo or running:
            while idle and todo:
                actor, (i, item) = idle.pop(), todo.pop(0)
                running[getattr(actor, method).remote(item)] = (actor, i, item)
            if not running:
                break  # every actor has died
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, i, item = running.pop(ref)
            what = _label(label, item, i)
            try:
                res = ray.get(ref)
            except ray.exceptions.RayError as e:
                if not is_system_failure(e):
                    raise _noted(e, what) from None
                try:
                    on_node = ray.get(where[actor], timeout=0)
                except Exception:  # noqa: BLE001 - it died before it answered: the message says less
                    on_node = None
                failure = machine_failure(ray, e, what, nodes, on_node)
                todo.insert(0, (i, item))
                if (idle or running) and on_lost is not None:
                    on_lost(item, describe(ray, e, nodes, on_node), len(idle) + len(running))
                continue
            idle.append(actor)
            yield item, res
        if todo:
            if lost_all is not None:
                raise lost_all([item for _, item in todo], failure)
            raise MachineFailure(f"every actor ({n}) died; {len(todo)} item(s) are not done. "
                                 f"Last failure: {failure.message}")
