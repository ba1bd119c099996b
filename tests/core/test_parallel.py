"""curate.core.parallel: the one bounded-parallel map (local and process backends; Ray is exercised by
tests/reshard/test_reshard.py on a two-node cluster and by tests/reliability/test_ray_chaos.py) and the stage
contract of curate.core.stage."""

from __future__ import annotations

import os

import pytest

from curate.core.errors import MachineFailure
from curate.core.parallel import Backend, Resources, pmap
from curate.core.stage import Marker, StageSummary, file_signature, fingerprint, versions


def square_plus(x: int, k: int) -> int:
    if x == 13:
        raise ValueError("thirteen")
    return x * x + k


def die_on(x: int) -> int:
    if x == 2:
        os._exit(3)  # the process dies as under the out-of-memory killer
    return x


def test_backend_choose_maps_the_shared_flags():
    assert Backend.choose(1).kind == "local"
    assert Backend.choose(3) == Backend("process", 3)
    assert Backend.choose(0, "127.0.0.1:1234") == Backend("ray", 0, "127.0.0.1:1234")
    assert Resources(cpus=2, memory=1 << 30).ray_options() == {"num_cpus": 2, "memory": 1 << 30}
    with pytest.raises(ValueError, match="never fork"):
        Backend("process", 2, start_method="fork")


def test_local_map_is_in_order_and_names_the_failing_item():
    assert list(pmap(square_plus, range(4), args=(1,))) == [(0, 1), (1, 2), (2, 5), (3, 10)]
    with pytest.raises(ValueError, match="thirteen") as e:
        list(pmap(square_plus, [12, 13], args=(0,), label=lambda x: f"square of {x}"))
    assert "(while running square of 13)" in e.value.__notes__


def test_process_map_bounds_what_is_in_flight_and_keeps_order():
    consumed = []

    def items():
        for i in range(12):
            consumed.append(i)
            yield i

    backend = Backend("process", 2)
    got = []
    for item, res in pmap(square_plus, items(), backend=backend, args=(0,), depth=2, chunksize=1):
        if not got:
            assert len(consumed) == 4  # 2 processes x depth 2: the rest of the items are not read yet
        got.append((item, res))
    assert got == [(i, i * i) for i in range(12)]
    # as completed, and in chunks: the same pairs
    unordered = pmap(square_plus, range(12), backend=backend, args=(0,), ordered=False, chunksize=5)
    assert sorted(unordered) == got


def test_process_map_task_error_and_dead_worker_name_the_item():
    backend = Backend("process", 2)
    with pytest.raises(ValueError, match="thirteen") as e:
        list(pmap(square_plus, [1, 13, 2], backend=backend, args=(0,), label=lambda x: f"square of {x}"))
    assert "(while running square of 13)" in e.value.__notes__
    # the pool breaks: whichever item's result is collected first names itself (the dead one, or one still running)
    with pytest.raises(MachineFailure, match=r"shard \d failed: a worker process died") as e:
        list(pmap(die_on, [0, 1, 2, 3], backend=backend, label=lambda x: f"shard {x}"))
    assert "rerun the same command" in e.value.message


def test_stage_contract(tmp_path):
    s = StageSummary("reshard", False, 1.23456, counts={"n_written": 3}, outputs={"out": "x"}, fields={"a": 1})
    assert s.as_dict() == {"a": 1, "n_written": 3, "out": "x", "up_to_date": False, "seconds": 1.235}
    assert fingerprint("a", "b") != fingerprint("b", "a") and len(fingerprint()) == 16
    m = Marker(tmp_path / "done.json")
    assert m.read() is None and m.matching("f") is None
    (tmp_path / "done.json").write_text("{not json")
    assert m.read() is None  # a torn marker means: not done
    m.write({"fingerprint": "f", "n": 1})
    assert m.matching("f") == {"fingerprint": "f", "n": 1} and m.matching("g") is None
    assert m.matching("f", key="n") is None
    sig = file_signature(tmp_path / "done.json")
    assert set(sig) == {"file", "size", "mtime_ns", "tail_sha256"} and sig["file"] == "done.json"
    v = versions("pyarrow", "no-such-distribution-xyz")
    assert set(v) == {"curate", "python", "pyarrow"}
