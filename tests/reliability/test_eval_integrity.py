"""Evaluation integrity: a partial eval set (a missing shard, deleted items) never passes as a full score.

`curate evaluate` counts each task's items against the size it must have - the task registry's for a DataComp
set as downloaded (no build.json), the build manifest's (build.json `n`) for sets curate builds - and refuses a
partial set with a CurateError naming the task, both counts and how to rebuild it. With --allow-partial the
line is marked `"partial": true` with `n_expected`, and averages, benchmark.results (leaderboard, bundles) and
`curate compare` leave it out. A full set scores exactly as before.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from benchmark import evalsets as E
from benchmark.evaluate import EvalConfig, evaluate, evaluate_cmd, format_table, read_results
from benchmark.results import average_score, is_partial, main_value
from benchmark.results import read_results as read_result_lines
from benchmark.tasks import TASKS
from curate.core.errors import CurateError
from tests.benchmark.test_evalsets import make_pool_evalsets
from tests.run_factory import random_checkpoint

ARCH = "curate-debug"
KITTI = "vtab/kitti_closest_vehicle_distance"  # the smallest DataComp classification set: 711 items, 4 classes
EMOJI = "offline/emoji_category"  # pool-derived: its size is whatever the build's held-out split holds


def _png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A random checkpoint and an evalsets root with a DataComp task at its registry size in 3 shards, laid out
    as `curate evalsets download` leaves it (nshards.txt, no build.json), and the offline suite's pool-derived
    tasks as `curate evalsets build-offline` writes them (build.json with `n`)."""
    root = tmp_path_factory.mktemp("integrity")
    ckpt = random_checkpoint(root / "model.pt", 0, ARCH)
    ev = root / "evalsets"
    pool = make_pool_evalsets(root / "pool", n_per_class=5)
    E.build_offline(E.BuildOfflineConfig(out=ev, pool_dir=pool, limit=40))
    colors = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
    samples = [{"__key__": f"{i:05d}", "png": _png(colors[i % 4]), "cls": str(i % 4)}
               for i in range(TASKS[KITTI].size)]
    folder = ev / TASKS[KITTI].folder
    E.write_evalset(folder, samples, ["red", "green", "blue", "yellow"], ["a {c} car."], shard_size=250)
    (folder / "build.json").unlink()  # as downloaded from DataComp: the registry's size is the expected one
    assert (folder / "test" / "nshards.txt").read_text().strip() == "3"
    return {"root": root, "ckpt": ckpt, "evalsets": ev}


def _cfg(world, evalsets: Path, out: Path, tasks: list[str], **kw) -> EvalConfig:
    return EvalConfig(model=ARCH, pretrained=str(world["ckpt"]), tasks=tasks, evalsets=evalsets, out=out,
                      batch_size=64, num_workers=0, progress=False, **kw)


def _copy(world, tmp_path) -> Path:
    ev = tmp_path / "evalsets"
    shutil.copytree(world["evalsets"], ev)
    return ev


def _drop_items(tar: Path, keep_every: int) -> int:
    """Rewrite a shard keeping only every `keep_every`-th sample; return the samples removed."""
    with tarfile.open(tar) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf if m.isfile()]
    keys = sorted({m.name.split(".", 1)[0] for m, _ in members})
    keep = set(keys[::keep_every])
    with tarfile.open(tar, "w") as tf:
        for m, data in members:
            if m.name.split(".", 1)[0] in keep:
                tf.addfile(m, io.BytesIO(data))
    return len(keys) - len(keep)


def _strip(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "seconds"}


def test_full_sets_score_unchanged(world, tmp_path):
    """Complete sets pass the check and their lines carry no partial marker; --allow-partial changes nothing."""
    s = evaluate(_cfg(world, world["evalsets"], tmp_path / "a.jsonl", [KITTI, EMOJI, "offline/digits"]))
    assert set(s["computed"]) == {KITTI, EMOJI, "offline/digits"}
    built = json.loads((world["evalsets"] / TASKS[EMOJI].folder / "build.json").read_text())["n"]
    assert s["results"][EMOJI]["n"] + s["results"][EMOJI]["n_failed"] == built
    assert s["results"][KITTI]["n"] == TASKS[KITTI].size
    for rec in s["results"].values():
        assert "partial" not in rec and "n_expected" not in rec and main_value(rec) is not None
    s2 = evaluate(_cfg(world, world["evalsets"], tmp_path / "b.jsonl", [KITTI, EMOJI, "offline/digits"],
                       allow_partial=True))
    assert {k: _strip(r) for k, r in s2["results"].items()} == {k: _strip(r) for k, r in s["results"].items()}
    assert "items, not a full score" not in format_table(s)


def test_missing_shard_of_a_datacomp_set_is_refused_then_marked(world, tmp_path):
    ev = _copy(world, tmp_path)
    (ev / TASKS[KITTI].folder / "test" / "1.tar").unlink()
    out = tmp_path / "eval_results.jsonl"
    with pytest.raises(CurateError) as e:
        evaluate(_cfg(world, ev, out, [KITTI, EMOJI]))
    msg = str(e.value)
    assert KITTI in msg and "461 items in 2 shard(s)" in msg and "711 are expected" in msg
    assert "task registry" in msg and "1.tar missing" in msg
    assert f"curate evalsets download --tasks {KITTI}" in msg and "--allow-partial" in msg
    assert EMOJI not in msg  # only the partial task is named
    assert not out.exists()  # refused before anything was scored

    s = evaluate(_cfg(world, ev, out, [KITTI, EMOJI], allow_partial=True))
    rec = read_results(out)[KITTI]
    assert rec["partial"] is True and rec["n_expected"] == 711 and rec["n"] + rec["n_failed"] == 461
    assert is_partial(rec) and main_value(rec) is None
    from tests.test_formats import Checker  # the partial line matches docs/FORMATS.md's block

    checker = Checker()
    checker.json("RUN/eval_results.jsonl", rec, "partial line")
    assert checker.problems["RUN/eval_results.jsonl"] == []
    assert "partial" not in s["results"][EMOJI]
    assert "PARTIAL: 461 of 711 items" in format_table(s)
    # benchmark.results (leaderboard, bundles) and the evaluator's own averages leave it out
    lines = read_result_lines(out)
    avg, missing = average_score(lines)
    assert missing == [KITTI] and avg == pytest.approx(main_value(s["results"][EMOJI]))
    assert KITTI in s["aggregates"]["datacomp"]["missing"] and s["aggregates"]["datacomp"]["n_tasks"] == 0

    # a later run without --allow-partial does not reuse the partial score: it checks the set again
    with pytest.raises(CurateError, match="711 are expected"):
        evaluate(_cfg(world, ev, out, [KITTI]))
    # once the shard is back, the task is scored in full and the partial line is replaced
    shutil.copy(world["evalsets"] / TASKS[KITTI].folder / "test" / "1.tar", ev / TASKS[KITTI].folder / "test" / "1.tar")
    s = evaluate(_cfg(world, ev, out, [KITTI]))
    assert s["computed"] == [KITTI] and "partial" not in read_results(out)[KITTI]
    assert read_results(out)[KITTI]["n"] == 711


def test_deleted_items_of_a_pool_derived_set_are_refused_against_its_build_manifest(world, tmp_path):
    ev = _copy(world, tmp_path)
    folder = ev / TASKS[EMOJI].folder
    n = json.loads((folder / "build.json").read_text())["n"]
    removed = _drop_items(folder / "test" / "0.tar", keep_every=2)
    assert 0 < removed < n
    with pytest.raises(CurateError) as e:
        evaluate(_cfg(world, ev, tmp_path / "r.jsonl", [EMOJI]))
    msg = str(e.value)
    assert EMOJI in msg and f"has {n - removed} items" in msg and f"{n} are expected" in msg
    assert "build manifest" in msg and "curate evalsets build-offline" in msg


def test_shard_missing_from_a_set_without_nshards_is_refused(world, tmp_path):
    """A folder of shards without nshards.txt (globbed): only the item count can notice a lost shard."""
    ev = _copy(world, tmp_path)
    test = ev / TASKS[KITTI].folder / "test"
    (test / "nshards.txt").unlink()
    (test / "2.tar").unlink()
    with pytest.raises(CurateError, match=r"500 items in 2 shard\(s\), but 711 are expected"):
        evaluate(_cfg(world, ev, tmp_path / "r.jsonl", [KITTI]))


def test_cli_refuses_and_marks(world, tmp_path):
    ev = _copy(world, tmp_path)
    (ev / TASKS[KITTI].folder / "test" / "0.tar").unlink()
    args = ["--model", ARCH, "--pretrained", str(world["ckpt"]), "--tasks", KITTI, "--evalsets", str(ev),
            "--out", str(tmp_path / "r.jsonl"), "--workers", "0"]
    r = CliRunner().invoke(evaluate_cmd, args)
    assert r.exit_code == 2 and "461 items" in r.output and "--allow-partial" in r.output  # a CurateError
    r = CliRunner().invoke(evaluate_cmd, args + ["--allow-partial"])
    assert r.exit_code == 0, r.output
    assert "PARTIAL: 461 of 711 items" in r.output


def test_compare_leaves_partial_tasks_out(world, tmp_path):
    from benchmark.compare import Seed, Side, shared_tasks

    full = evaluate(_cfg(world, world["evalsets"], tmp_path / "full.jsonl", [KITTI, EMOJI]))["results"]
    partial = {k: dict(v) for k, v in full.items()}
    partial[KITTI].update(partial=True, n_expected=711)
    a = Side("A", [Seed("A", full, 0, None, None)])
    b = Side("B", [Seed("B", partial, 0, None, None)])
    keys, excluded, _ = shared_tasks(a, b)
    assert keys == [EMOJI] and "partial eval set" in excluded[KITTI]
