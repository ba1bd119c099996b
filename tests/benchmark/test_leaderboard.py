"""The local leaderboard ranks by mean over seeds, reports spread, compares per task, and writes the HTML page."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import numpy as np
import pytest
from click.testing import CliRunner

from benchmark import leaderboard as lb
from benchmark.submit import SubmitConfig, submit
from curate.cli import main
from curate.core.errors import CurateError
from tests.run_factory import make_run, make_subset

UIDS = [f"{i:032x}" for i in range(1, 40)]

# name -> (subset size, per-seed task scores)
SUBMISSIONS = {
    "no_filter": (30, [{"a": 0.20, "b": 0.10}, {"a": 0.24, "b": 0.12}, {"a": 0.22, "b": 0.08}]),
    "clip_30pct": (10, [{"a": 0.30, "b": 0.20}, {"a": 0.34, "b": 0.16}, {"a": 0.26, "b": 0.18}]),
    "dedup_clip": (8, [{"a": 0.25, "b": 0.20}]),
}


@pytest.fixture
def db(tmp_path) -> Path:
    db = tmp_path / "lb.duckdb"
    for name, (size, seeds) in SUBMISSIONS.items():
        subset = make_subset(tmp_path / f"subset_{name}", UIDS[:size], name=name)
        for seed, scores in enumerate(seeds):
            run = make_run(tmp_path / f"run_{name}_{seed}", subset, seed=seed, scores=scores)
            submit(SubmitConfig(run=run, leaderboard_db=db, tarball=False))
    return db


def _avg(scores: dict) -> float:
    return float(np.mean(list(scores.values())))


def test_ranking_mean_std_and_sizes(db):
    rows = lb.standings(db)
    expected = {n: [_avg(s) for s in seeds] for n, (_, seeds) in SUBMISSIONS.items()}
    order = sorted(expected, key=lambda n: -np.mean(expected[n]))
    assert [r.name for r in rows] == order == ["clip_30pct", "dedup_clip", "no_filter"]
    for r in rows:
        assert r.rank == order.index(r.name) + 1
        assert r.mean == pytest.approx(np.mean(expected[r.name]))
        assert r.seeds == len(expected[r.name])
        assert r.subset_size == SUBMISSIONS[r.name][0]
        if r.seeds > 1:
            assert r.std == pytest.approx(np.std(expected[r.name], ddof=1))
        else:
            assert r.std is None


def test_one_row_per_submission_and_seed_resubmit_replaces(db, tmp_path):
    con = duckdb.connect(str(db), read_only=True)
    n = con.execute("SELECT count(*) FROM submissions").fetchone()[0]
    nr = con.execute("SELECT count(*) FROM results").fetchone()[0]
    con.close()
    assert n == 7 and nr == 14
    # re-submitting seed 0 of no_filter with a new score replaces its row, it does not add one
    subset = tmp_path / "subset_no_filter"
    run = make_run(tmp_path / "run_again", subset, seed=0, scores={"a": 0.9, "b": 0.9})
    submit(SubmitConfig(run=run, leaderboard_db=db, tarball=False))
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM submissions").fetchone()[0] == 7
    assert con.execute("SELECT average FROM submissions WHERE name='no_filter' AND seed=0").fetchone()[0] == pytest.approx(0.9)
    con.close()
    assert lb.standings(db)[0].name == "no_filter"


def test_compare_per_task_deltas(db):
    rows = {r[0]: r[1:] for r in lb.compare(db, "no_filter", "clip_30pct")}
    a_nf = np.mean([s["a"] for s in SUBMISSIONS["no_filter"][1]])
    a_cl = np.mean([s["a"] for s in SUBMISSIONS["clip_30pct"][1]])
    assert rows["a"][0] == pytest.approx(a_nf) and rows["a"][1] == pytest.approx(a_cl)
    assert rows["a"][2] == pytest.approx(a_cl - a_nf)
    b_delta = np.mean([s["b"] for s in SUBMISSIONS["clip_30pct"][1]]) - np.mean([s["b"] for s in SUBMISSIONS["no_filter"][1]])
    assert rows["b"][2] == pytest.approx(b_delta)
    avg_delta = np.mean([_avg(s) for s in SUBMISSIONS["clip_30pct"][1]]) - np.mean([_avg(s) for s in SUBMISSIONS["no_filter"][1]])
    assert rows["average"][2] == pytest.approx(avg_delta)
    with pytest.raises(CurateError, match="no submission named 'nope'"):
        lb.compare(db, "no_filter", "nope")


def test_scale_filter(db, tmp_path):
    subset = make_subset(tmp_path / "s_tiny", UIDS[:5], name="tiny_one")
    submit(SubmitConfig(run=make_run(tmp_path / "r_tiny", subset, scale="tiny", scores={"a": 0.99}),
                        leaderboard_db=db, tarball=False))
    assert [r.name for r in lb.standings(db, "tiny")] == ["tiny_one"]
    assert "tiny_one" not in [r.name for r in lb.standings(db, "debug")]


def test_html_page_has_table_and_plots(db, tmp_path):
    out = lb.write_html(db, tmp_path / "lb.html")
    page = out.read_text()
    assert len(re.findall(r"src='data:image/png;base64,", page)) == 3
    for name in SUBMISSIONS:
        assert name in page
    assert "Seed spread" in page and "Per-task scores" in page and "Average vs subset size" in page


def test_cli_table_compare_html(db, tmp_path):
    r = CliRunner().invoke(main, ["leaderboard", "--db", str(db), "--html", str(tmp_path / "x.html")])
    assert r.exit_code == 0, r.output
    lines = [l for l in r.output.splitlines() if re.match(r"\s+\d+\s", l)]
    assert [l.split()[1] for l in lines] == ["clip_30pct", "dedup_clip", "no_filter"]
    assert "±" in lines[0] and (tmp_path / "x.html").is_file()
    r = CliRunner().invoke(main, ["leaderboard", "--db", str(db), "--compare", "no_filter", "clip_30pct"])
    assert r.exit_code == 0, r.output
    assert re.search(r"^a\s+0\.2200\s+0\.3000\s+\+0\.0800", r.output, re.M), r.output
    r = CliRunner().invoke(main, ["leaderboard", "--db", str(tmp_path / "none.duckdb")])
    assert r.exit_code == 2 and "no leaderboard yet" in r.output
