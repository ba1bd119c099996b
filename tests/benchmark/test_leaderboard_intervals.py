"""The leaderboard's honest ranking (issue 18, item 4): recipes grouped by recipe hash and scale, 95% intervals
over seeds (item-level with one seed: tests/benchmark/test_bundle_items.py), separable ranks from Holm-corrected
pairwise tests, error-bar plots per task group with chance levels, and old leaderboard files migrated in place."""

from __future__ import annotations

import json
import re
from pathlib import Path

import duckdb
import numpy as np
import pytest
from click.testing import CliRunner

from benchmark import leaderboard as lb
from benchmark import stats as S
from benchmark.submit import SubmitConfig, submit
from curate.cli import main
from curate.core import atomic
from tests.run_factory import make_run, make_subset

UIDS = [f"{i:032x}" for i in range(1, 40)]

# The schema of leaderboard files written before versioning (benchmark/leaderboard.py as first released) and
# the rows its add_bundle inserted: frozen here so the migration is tested against what users have on disk.
SCHEMA_V1 = """
CREATE TABLE submissions (
    name VARCHAR NOT NULL, scale VARCHAR NOT NULL, seed BIGINT NOT NULL,
    recipe VARCHAR, arch VARCHAR, official BOOLEAN, subset_size BIGINT, unique_uids BIGINT, uids_sha256 VARCHAR,
    average DOUBLE, n_tasks INTEGER, n_missing INTEGER, bundle VARCHAR, created_at VARCHAR,
    added_at TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (name, scale, seed)
);
CREATE TABLE results (
    name VARCHAR NOT NULL, scale VARCHAR NOT NULL, seed BIGINT NOT NULL,
    key VARCHAR NOT NULL, dataset VARCHAR, metric VARCHAR, score DOUBLE,
    PRIMARY KEY (name, scale, seed, key)
);
"""


def v1_db(path: Path, subs: dict[str, list[dict]]) -> Path:
    con = duckdb.connect(str(path))
    con.execute(SCHEMA_V1)
    for name, seeds in subs.items():
        for seed, scores in enumerate(seeds):
            con.execute("INSERT INTO submissions (name, scale, seed, recipe, arch, official, subset_size, unique_uids, "
                        "uids_sha256, average, n_tasks, n_missing, bundle, created_at) VALUES "
                        "(?, 'debug', ?, ?, 'curate-debug', true, 10, 10, 'x', ?, ?, 0, NULL, '2026-01-01T00:00:00Z')",
                        [name, seed, name, float(np.mean(list(scores.values()))), len(scores)])
            con.executemany("INSERT INTO results VALUES (?, 'debug', ?, ?, ?, 'acc1', ?)",
                            [(name, seed, k, k, v) for k, v in scores.items()])
    con.close()
    return path


OLD = {"old_a": [{"cifar10": 0.30, "vtab/dtd": 0.10}, {"cifar10": 0.32, "vtab/dtd": 0.12},
                 {"cifar10": 0.31, "vtab/dtd": 0.11}],
       "old_b": [{"cifar10": 0.20, "vtab/dtd": 0.05}]}


def test_old_leaderboard_file_is_migrated_not_broken(tmp_path):
    db = v1_db(tmp_path / "old.duckdb", OLD)
    rows = lb.standings(db)  # read-only open migrates first
    assert [r.name for r in rows] == ["old_a", "old_b"]
    a = rows[0]
    per_seed = [np.mean(list(s.values())) for s in OLD["old_a"]]
    iv = S.seed_interval(per_seed)
    assert a.interval == "seeds" and (a.low, a.high) == pytest.approx((iv.low, iv.high))
    assert rows[1].interval == "n=1" and rows[1].low is None and rows[1].pool_success_share is None
    con = duckdb.connect(str(db), read_only=True)
    assert lb.schema_version(con) == lb.SCHEMA_VERSION
    cols = {r[0] for r in con.execute("DESCRIBE submissions").fetchall()}
    assert {"recipe_hash", "pool_success_share", "item_low"} <= cols
    assert con.execute("SELECT count(*) FROM results").fetchone()[0] == 8  # no row lost
    con.close()
    # a new bundle goes into the migrated file beside the old rows; the page and compare still work
    subset = make_subset(tmp_path / "s", UIDS[:10], name="new_one")
    submit(SubmitConfig(run=make_run(tmp_path / "r", subset, scores={"cifar10": 0.9, "vtab/dtd": 0.9}),
                        leaderboard_db=db, tarball=False))
    assert [r.name for r in lb.standings(db)] == ["new_one", "old_a", "old_b"]
    page = lb.write_html(db, tmp_path / "lb.html").read_text()
    assert "old_a" in page and "new_one" in page
    r = CliRunner().invoke(main, ["compare", "old_a", "new_one", "--db", str(db)])
    assert r.exit_code == 0 and "verdict:" in r.output, r.output
    # migrating twice is a no-op
    con = duckdb.connect(str(db))
    assert lb.migrate(con) == lb.SCHEMA_VERSION
    con.close()


def _lb(tmp_path, recipes: dict[str, tuple[str, list[dict]]], scale: str = "debug", db=None) -> Path:
    """recipes: submission name -> (recipe text key, per-seed scores); the same key = the same recipe hash."""
    db = db or tmp_path / "lb.duckdb"
    for name, (recipe, seeds) in recipes.items():
        subset = make_subset(tmp_path / f"s_{name}_{scale}", UIDS[:12], name=name)
        man = json.loads((subset / "manifest.json").read_text())
        man["recipe_hash"] = f"hash-{recipe}"
        atomic.write_json(subset / "manifest.json", man)
        for seed, scores in enumerate(seeds):
            run = make_run(tmp_path / f"r_{name}_{scale}_{seed}", subset, seed=seed, scale=scale, scores=scores)
            submit(SubmitConfig(run=run, leaderboard_db=db, tarball=False))
    return db


def _seeds(base: float, spread=(0.0, 0.01, -0.01)) -> list[dict]:
    return [{"cifar10": base + d, "vtab/dtd": base / 2 + d / 2} for d in spread]


def test_separable_rank_from_holm_corrected_pairwise_tests(tmp_path):
    # best is far above; mid and low differ by less than their seed noise; one_seed has a single seed
    recipes = {"best": ("b", _seeds(0.50)), "mid": ("m", _seeds(0.30)), "low": ("l", _seeds(0.29, (0.0, 0.02, -0.015))),
               "one_seed": ("o", [{"cifar10": 0.31, "vtab/dtd": 0.15}])}
    rows = {r.name: r for r in lb.standings(_lb(tmp_path, recipes))}
    assert [rows[n].rank for n in ("best", "one_seed", "mid", "low")] == [1, 2, 3, 4]  # position by mean
    assert rows["best"].separable_rank == 1 and rows["best"].tied_with == []
    assert rows["mid"].separable_rank == 2 and rows["low"].separable_rank == 2  # only "best" beats them
    assert "low" in rows["mid"].tied_with and "mid" in rows["low"].tied_with
    # the p-values behind it: seed_difference on per-seed averages, Holm over the 6 pairs
    avg = {n: [np.mean(list(s.values())) for s in seeds] for n, (_, seeds) in recipes.items()}
    names = sorted(recipes, key=lambda n: -np.mean(avg[n]))
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    adj = dict(zip(pairs, S.holm([S.seed_difference(avg[a], avg[b]).p_value for a, b in pairs])))
    for (a, b), p in adj.items():
        assert (b in rows[a].tied_with) == (p >= 0.05), (a, b, p)
    # 1 + 3 seeds is a test (seed variance from the 3-seed side); the single seed sits between the others
    assert rows["one_seed"].untested == [] and rows["one_seed"].interval == "n=1"
    iv = S.seed_interval(avg["mid"])
    assert (rows["mid"].low, rows["mid"].high) == pytest.approx((iv.low, iv.high)) and rows["mid"].seeds == 3


def test_groups_by_recipe_hash_and_scale_with_names_as_label(tmp_path):
    db = _lb(tmp_path, {"alpha": ("same", _seeds(0.4)[:2]), "alpha_renamed": ("same", _seeds(0.4)[2:]),
                        "other": ("x", _seeds(0.2))})
    _lb(tmp_path, {"alpha": ("same", _seeds(0.1))}, scale="tiny", db=db)
    rows = lb.standings(db)
    assert [(r.name, r.scale, r.seeds) for r in rows] == [
        ("alpha / alpha_renamed", "debug", 3), ("other", "debug", 3), ("alpha", "tiny", 3)]
    assert rows[0].recipe_hash == "hash-same"
    # recipes at different scales are never tested against each other
    assert rows[2].separable_rank == 1 and rows[2].tied_with == []
    assert [r.name for r in lb.standings(db, "tiny")] == ["alpha"]


def test_html_draws_groups_with_chance_levels(tmp_path, monkeypatch):
    evalsets = tmp_path / "evalsets"
    folder = evalsets / "wds_offline_v2-animal_silhouettes_test"
    folder.mkdir(parents=True)
    (folder / "build.json").write_text(json.dumps({"n": 40, "chance": {"main": 0.125, "acc1": 0.125}}))
    emoji = evalsets / "wds_offline-emoji_category_test"
    emoji.mkdir(parents=True)
    (emoji / "classnames.txt").write_text("smileys\nanimals\nfood\nflags\n")
    monkeypatch.setenv("CURATE_EVALSETS", str(evalsets))
    scores = [{"vtab/cifar100": 0.1 + d, "vtab/dtd": 0.05 + d, "imagenet1k": 0.02 + d, "cifar10": 0.3 + d,
               "offline_v2/animal_silhouettes": 0.2 + d, "offline/digits": 0.15 + d, "offline/emoji_category": 0.4 + d}
              for d in (0.0, 0.01, -0.01)]
    db = _lb(tmp_path, {"r1": ("1", scores), "r2": ("2", [{k: v + 0.05 for k, v in s.items()} for s in scores])})
    assert lb.chance_level("offline_v2/animal_silhouettes") == pytest.approx(0.125)
    assert lb.chance_level("offline/emoji_category") == pytest.approx(0.25)
    assert lb.chance_level("vtab/cifar100") == pytest.approx(0.01) and lb.chance_level("offline/digits") == 0.1
    groups = lb.task_groups([k for k in scores[0]])
    assert set(groups) == {"vtab", "imagenet", "style_shift", "out_of_domain"}
    page = lb.write_html(db, tmp_path / "lb.html").read_text()
    titles = re.findall(r"<h2>([^<]+)</h2><img", page)
    assert titles == ["Average vs subset size", "Per-task scores", "Seed spread"] + [f"Task group: {g}" for g in groups]
    assert len(re.findall(r"src='data:image/png;base64,", page)) == 7
    chance_rows = dict(re.findall(r"<tr><td>([^<]+)</td><td>([-0-9.]+)</td></tr>", page.split("Chance levels")[1]))
    assert chance_rows["offline_v2/animal_silhouettes"] == "0.1250" and chance_rows["vtab/dtd"] == "0.0213"
    assert chance_rows["offline/emoji_category"] == "0.2500"
    assert "separable rank" in page and "tied with" in page
