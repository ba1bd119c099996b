"""Bundles carry the run's per-item results (hashed, listed in bundle.json); `curate verify` recomputes every
claimed score from them, so a changed prediction fails verification even after the bundle is re-hashed; and the
leaderboard gives a single-seed entry the item-level interval of its one model."""

from __future__ import annotations

import hashlib
import shutil
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from benchmark import leaderboard as lb
from benchmark import stats as S
from benchmark.evaluate import items_path, main_metric_cells, metrics_from_items, read_items, write_items
from benchmark.submit import SubmitConfig, VerifyConfig, submit, verify
from benchmark.tasks import TASKS
from curate.cli import main
from curate.core import atomic
from tests.run_factory import make_run, make_subset

UIDS = [f"{i:032x}" for i in range(1, 40)]
RET = "retrieval/mscoco_2014_5k_test_image_text_retrieval"
KEYS = {"cifar10": 0.6, "vtab/caltech101": 0.4, RET: 0.3}  # acc1, mean per-class recall, retrieval


def write_item_results(run: Path, acc: dict[str, float], seed: int = 0, n: int = 300) -> Path:
    """Replace RUN's results with ones `curate evaluate` would write: a results line per task and its
    per-item file (same model id), the metrics recomputed from the items."""
    rng = np.random.default_rng(seed)
    out = run / "eval_results.jsonl"
    mid = f"curate-debug__{hashlib.sha256(str(run).encode()).hexdigest()[:12]}"
    lines = []
    for key, a in acc.items():
        keys = np.array([f"{i:05d}" for i in range(n)])
        right = rng.random(n) < a
        if TASKS[key].type == "retrieval":
            ranks = np.where(rng.random(2 * n) < a, 0, rng.integers(1, 20, 2 * n))
            items = {"key": keys, "n_captions": np.full(n, 2), "text_rank": np.where(right, 0, 4),
                     "caption_ranks": (ranks, np.full(n, 2))}
            extra = {}
        else:
            target = rng.integers(0, 10, n)
            items = {"key": keys, "target": target, "pred": np.where(right, target, (target + 1) % 10),
                     "rank": np.where(right, 0, 1 + rng.integers(0, 8, n))}
            extra = {"n_classes": 10}
        meta = {"model_id": mid, "task": key, "main_metric": TASKS[key].main_metric, "kind": TASKS[key].type,
                "evalset_fingerprint": f"fp-{key}", "n": n, **extra}
        write_items(items_path(out, key), items, meta)
        back = {k: (v[0] if k == "caption_ranks" else v) for k, v in items.items()}
        lines.append({"key": key, "dataset": TASKS[key].name, "main_metric": TASKS[key].main_metric,
                      "metrics": metrics_from_items(TASKS[key], back, meta), "n": n, "model_id": mid,
                      "evalset_fingerprint": f"fp-{key}"})
    atomic.write_text(out, "".join(json.dumps(r) + "\n" for r in lines))
    return run


@pytest.fixture
def setup(tmp_path):
    pool = tmp_path / "pool"
    (pool / "metadata").mkdir(parents=True)
    import pyarrow as pa

    atomic.write_parquet(pool / "metadata" / "00000000.parquet",
                         pa.table({"uid": UIDS, "status": ["success"] * len(UIDS)}))
    subset = make_subset(tmp_path / "subset", UIDS[:20], name="itemised")
    run = write_item_results(make_run(tmp_path / "run", subset, seed=0), KEYS)
    return pool, subset, run


def rehash(bundle: Path) -> None:
    """What a forger does after editing: recompute every declared hash so `file hashes` passes."""
    decl = json.loads((bundle / "bundle.json").read_text())
    decl["files"] = {f: hashlib.sha256((bundle / f).read_bytes()).hexdigest() for f in decl["files"]}
    (bundle / "bundle.json").write_text(json.dumps(decl))


def _check(rep, name):
    return next((c for c in rep.checks if c[0] == name), None)


def test_bundle_carries_item_files_hashed_and_listed(setup):
    pool, _, run = setup
    s = submit(SubmitConfig(run=run))
    b = Path(s["bundle"])
    items = sorted(p.name for p in (b / "results.items").glob("*.parquet"))
    assert items == sorted(items_path(run / "eval_results.jsonl", k).name for k in KEYS)
    decl = json.loads((b / "bundle.json").read_text())
    for name in items:
        f = f"results.items/{name}"
        assert decl["files"][f] == hashlib.sha256((b / f).read_bytes()).hexdigest()
        assert (b / f).read_bytes() == (run / "eval_results.items" / name).read_bytes()  # byte for byte
    assert decl["items"] == {"dir": "results.items", "tasks": sorted(KEYS), "without_items": []}
    with tarfile.open(s["tarball"]) as tar:
        assert {f"submission/results.items/{n}" for n in items} <= set(tar.getnames())
    for target in (b, Path(s["tarball"])):
        rep = verify(VerifyConfig(bundle=target, pool=pool))
        assert rep.ok, rep.reasons
        c = _check(rep, "item scores")
        assert c[1] and c[2].startswith("3 task(s) recomputed"), c
    # re-submitting an unchanged run rewrites nothing
    assert submit(SubmitConfig(run=run))["unchanged"]


def _flip_one_prediction(bundle: Path, key: str = "cifar10") -> None:
    path = items_path(bundle / "results.jsonl", key)
    table = pq.read_table(path)
    cols = {n: table.column(n).to_numpy(zero_copy_only=False).copy() for n in table.column_names}
    i = int(np.nonzero(cols["rank"] == 0)[0][0])  # a correctly classified item becomes wrong
    cols["rank"][i] = 1
    cols["pred"][i] = (cols["target"][i] + 1) % 10
    meta = json.loads(table.schema.metadata[b"curate.items"])
    meta.pop("format")
    write_items(path, cols, meta)


def test_changed_prediction_fails_verification_even_rehashed(setup):
    pool, _, run = setup
    b = Path(submit(SubmitConfig(run=run, tarball=False))["bundle"])
    _flip_one_prediction(b)
    rehash(b)
    rep = verify(VerifyConfig(bundle=b, pool=pool))
    assert _check(rep, "file hashes")[1]  # the forger's re-hash makes the hashes agree ...
    assert not rep.ok and not _check(rep, "item scores")[1]  # ... but the scores no longer match the items
    assert "cifar10: acc1 claimed" in _check(rep, "item scores")[2]
    r = CliRunner().invoke(main, ["verify", str(b), "--pool", str(pool)])
    assert r.exit_code == 1 and "item scores" in r.output


def test_changed_score_fails_verification_even_rehashed(setup):
    pool, _, run = setup
    b = Path(submit(SubmitConfig(run=run, tarball=False))["bundle"])
    lines = [json.loads(l) for l in (b / "results.jsonl").read_text().splitlines()]
    for l in lines:
        if l["key"] == RET:
            l["metrics"]["mean_recall@1"] += 0.05
    (b / "results.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    decl = json.loads((b / "bundle.json").read_text())
    from benchmark.results import average_score

    decl["average"] = average_score(lines)[0]  # a careful forger fixes the average too
    (b / "bundle.json").write_text(json.dumps(decl))
    rehash(b)
    rep = verify(VerifyConfig(bundle=b, pool=pool))
    assert _check(rep, "average")[1] and _check(rep, "file hashes")[1]
    assert not rep.ok and f"{RET}: mean_recall@1 claimed" in _check(rep, "item scores")[2]


def test_undeclared_or_unsafe_item_files_fail(setup):
    pool, _, run = setup
    b = Path(submit(SubmitConfig(run=run, tarball=False))["bundle"])
    (b / "results.items" / "extra.parquet").write_bytes(b"x")
    rep = verify(VerifyConfig(bundle=b, pool=pool))
    assert not rep.ok and "results.items/extra.parquet" in _check(rep, "file hashes")[2]
    (b / "results.items" / "extra.parquet").unlink()
    decl = json.loads((b / "bundle.json").read_text())
    decl["files"]["../outside.txt"] = "0" * 64
    (b / "bundle.json").write_text(json.dumps(decl))
    rep = verify(VerifyConfig(bundle=b, pool=pool))
    assert not rep.ok and "outside the bundle" in _check(rep, "file hashes")[2]


def test_run_without_item_files_still_bundles_with_a_warning(setup, tmp_path):
    pool, subset, _ = setup
    run = make_run(tmp_path / "old_run", subset, seed=1)  # results from before per-item files (unregistered keys)
    b = Path(submit(SubmitConfig(run=run, tarball=False))["bundle"])
    assert not (b / "results.items").exists()
    rep = verify(VerifyConfig(bundle=b, pool=pool))
    assert rep.ok and _check(rep, "item scores")[2].startswith("warning: no per-item results")


def test_leaderboard_single_seed_gets_item_level_interval(setup, tmp_path):
    _, _, run = setup
    db = tmp_path / "lb.duckdb"
    b = Path(submit(SubmitConfig(run=run, tarball=False, leaderboard_db=db))["bundle"])
    (row,) = lb.standings(db)
    assert row.seeds == 1 and row.interval == "items" and row.std is None
    # the interval is stats.intervals' suite average over the bundle's own item files
    cells = {}
    for k in KEYS:
        items, _ = read_items(b / "results.jsonl", k)
        stat, cols = main_metric_cells(TASKS[k], items)
        cells[k] = S.TaskCells.of(stat, cols)
    avg = S.intervals(cells, seed=0)["average"]
    assert (row.low, row.high) == pytest.approx((avg.low, avg.high))
    assert row.low < row.mean < row.high
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    got = dict(con.execute("SELECT key, chance FROM results").fetchall())
    lows = con.execute("SELECT count(*) FROM results WHERE item_low < score AND score < item_high").fetchone()[0]
    con.close()
    assert got["cifar10"] == pytest.approx(0.1) and got[RET] == pytest.approx(1 / 300) and lows == 3
    r = CliRunner().invoke(main, ["leaderboard", "--db", str(db)])
    assert r.exit_code == 0 and " items" in r.output, r.output


def test_compare_reads_a_bundles_item_files(setup, tmp_path):
    # one seed per side: the item-level paired interval comes from the bundles' results.items/, as from RUNs
    from benchmark import compare as C

    pool, _, run = setup
    other = tmp_path / "other_run"
    shutil.copytree(run, other)
    write_item_results(other, {k: 0.5 for k in KEYS}, seed=1)
    ba = Path(submit(SubmitConfig(run=run, tarball=False))["bundle"])
    bb = Path(submit(SubmitConfig(run=other, tarball=False))["bundle"])
    rep = C.compare(C.load_paths(str(ba)), [C.load_paths(str(bb))])[0]
    assert rep["mode"] == "items" and not [n for n in rep["notes"] if "no item-level interval" in n]
    shutil.rmtree(bb / "results.items")
    rep = C.compare(C.load_paths(str(ba)), [C.load_paths(str(bb))])[0]
    assert any("carries no per-item results" in n for n in rep["notes"])
