"""Completeness travels with results (issue 21, item 5): the share of a pool's input rows that downloaded is read
from its pool.json (null, with a note, for imported DataComp metadata), carried by bundles into the leaderboard,
and `curate compare` warns when two entries' pools differ by more than --completeness-tolerance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from benchmark import compare as C
from benchmark import leaderboard as lb
from benchmark.submit import SubmitConfig, submit
from curate.cli import main
from curate.core import atomic
from curate.pool.completeness import IMPORTED_NOTE, pool_completeness
from tests.run_factory import make_run, make_subset

UIDS = [f"{i:032x}" for i in range(1, 40)]


def downloaded_pool(dir: Path, rows: int, success: int, state: str = "complete") -> Path:
    """A POOL folder with the pool.json fields `curate download` writes (input rows, counts by status)."""
    dir.mkdir(parents=True)
    counts = {"success": success, "failed_to_download": rows - success}
    atomic.write_json(dir / "pool.json", {"format": "curate-pool-1", "state": state, "shards": 1,
                                          "input": {"path": "urls.parquet", "rows": rows, "sha256": "0" * 64},
                                          "counts": {k: v for k, v in counts.items() if v}})
    return dir


def imported_pool(dir: Path) -> Path:
    dir.mkdir(parents=True)
    atomic.write_json(dir / "datacomp.json", {"source": "somewhere", "rows": 100})
    return dir


def subset_of(pool: Path, dir: Path, name: str) -> Path:
    """A SUBSET whose manifest names `pool`, as `curate filter` writes it."""
    subset = make_subset(dir, UIDS[:20], name=name)
    man = json.loads((subset / "manifest.json").read_text())
    man["pool"] = str(pool.resolve())
    atomic.write_json(subset / "manifest.json", man)
    return subset


def test_share_from_pool_json_and_imported_pools_say_unknown(tmp_path):
    c = pool_completeness(downloaded_pool(tmp_path / "p", rows=200, success=170))
    assert c["success_share"] == pytest.approx(0.85) and c["source"] == "download"
    assert (c["success"], c["input_rows"]) == (170, 200) and c["note"] == "170 of 200 input rows downloaded"
    c = pool_completeness(downloaded_pool(tmp_path / "q", rows=10, success=4, state="in_progress"))
    assert c["success_share"] == pytest.approx(0.4) and "in_progress" in c["note"]
    c = pool_completeness(imported_pool(tmp_path / "dc"))
    assert c["success_share"] is None and c["source"] == "datacomp_import" and c["note"] == IMPORTED_NOTE
    assert pool_completeness(tmp_path / "gone")["success_share"] is None
    assert "not found" in pool_completeness(tmp_path / "gone")["note"]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "pool.json").write_text("{not json")
    assert "unreadable" in pool_completeness(tmp_path / "bad")["note"]


@pytest.fixture
def entries(tmp_path):
    """Three recipes x 3 seeds in one leaderboard: 'full' on a 95% pool, 'same' on a 94% pool, 'partial' on an
    80% pool, and one seed of 'imported' filtered from DataComp's released metadata."""
    db = tmp_path / "lb.duckdb"
    pools = {"full": downloaded_pool(tmp_path / "p95", 1000, 950), "same": downloaded_pool(tmp_path / "p94", 1000, 940),
             "partial": downloaded_pool(tmp_path / "p80", 1000, 800), "imported": imported_pool(tmp_path / "dc")}
    bundles = {}
    for name, pool in pools.items():
        subset = subset_of(pool, tmp_path / f"subset_{name}", name)
        for seed in range(1 if name == "imported" else 3):
            run = make_run(tmp_path / f"run_{name}_{seed}", subset, seed=seed,
                           scores={"a": 0.2 + 0.01 * seed, "b": 0.1 + 0.02 * seed})
            bundles.setdefault(name, []).append(Path(submit(SubmitConfig(run=run, leaderboard_db=db,
                                                                         tarball=False))["bundle"]))
    return db, bundles


def test_bundles_and_leaderboard_carry_completeness(entries):
    db, bundles = entries
    decl = json.loads((bundles["partial"][0] / "bundle.json").read_text())
    assert decl["pool_completeness"]["success_share"] == pytest.approx(0.8)
    assert decl["pool_completeness"]["note"] == "800 of 1000 input rows downloaded"
    imp = json.loads((bundles["imported"][0] / "bundle.json").read_text())["pool_completeness"]
    assert imp["success_share"] is None and imp["note"] == IMPORTED_NOTE
    rows = {s.name: s for s in lb.standings(db)}
    assert rows["partial"].pool_success_share == pytest.approx(0.8)
    assert rows["full"].pool_success_share == pytest.approx(0.95)
    assert rows["imported"].pool_success_share is None and rows["imported"].completeness_note == IMPORTED_NOTE
    r = CliRunner().invoke(main, ["leaderboard", "--db", str(db)])
    assert r.exit_code == 0 and "80.0%" in r.output and "95.0%" in r.output, r.output


def test_compare_warns_on_unequal_pools_beyond_the_tolerance(entries):
    db, bundles = entries
    # by leaderboard name and by bundle paths: 95% vs 80% is beyond the default 2% tolerance
    for a, b in (("full", "partial"),
                 (",".join(map(str, bundles["full"])), ",".join(map(str, bundles["partial"])))):
        r = CliRunner().invoke(main, ["compare", a, b, "--db", str(db)])
        assert r.exit_code == 0, r.output
        assert "WARNING: pool completeness differs by 15.0%" in r.output and "tolerance 2.0%" in r.output
    r = CliRunner().invoke(main, ["compare", "full", "partial", "--db", str(db), "--completeness-tolerance", "0.2"])
    assert r.exit_code == 0 and "WARNING" not in r.output, r.output
    r = CliRunner().invoke(main, ["compare", "full", "same", "--db", str(db)])  # 1% apart: within 2%
    assert r.exit_code == 0 and "WARNING" not in r.output and "completeness unknown" not in r.output, r.output
    r = CliRunner().invoke(main, ["compare", "full", "imported", "--db", str(db), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)["comparisons"][0]
    assert rep["completeness"]["warning"] is None and rep["completeness"]["b"] == [None]
    assert any("pool completeness unknown" in n and IMPORTED_NOTE in n for n in rep["notes"])


def test_compare_of_run_folders_reads_the_pool_through_the_manifest(tmp_path):
    sides = []
    for name, success in (("x", 990), ("y", 900)):
        subset = subset_of(downloaded_pool(tmp_path / f"pool_{name}", 1000, success), tmp_path / f"s_{name}", name)
        sides.append(C.load_paths(str(make_run(tmp_path / f"r_{name}", subset, scores={"a": 0.3, "b": 0.2}))))
    rep = C.compare(sides[0], sides[1:])[0]
    assert rep["completeness"]["gap"] == pytest.approx(0.09)
    assert rep["warnings"] and "9.0%" in C.format_report(rep)
    assert C.compare(sides[0], sides[1:], completeness_tolerance=0.1)[0]["warnings"] == []


def test_verify_shows_declared_and_actual_pool_completeness(entries, tmp_path):
    from benchmark.submit import VerifyConfig, verify

    _, bundles = entries
    pool = downloaded_pool(tmp_path / "verifier_pool", 1000, 950)
    import pyarrow as pa

    atomic.write_parquet(pool / "metadata" / "00000000.parquet",
                         pa.table({"uid": UIDS, "status": ["success"] * len(UIDS)}))
    checks = {c[0]: c for c in verify(VerifyConfig(bundle=bundles["partial"][0], pool=pool)).checks}
    assert checks["pool completeness"][1]  # informational: a bundle from a less complete pool is still valid
    assert checks["pool completeness"][2].startswith("warning: declared 80.0% of the input downloaded, this pool 95.0%")
    checks = {c[0]: c for c in verify(VerifyConfig(bundle=bundles["full"][0], pool=pool)).checks}
    assert checks["pool completeness"][2] == "declared 95.0% of the input downloaded, this pool 95.0%"
