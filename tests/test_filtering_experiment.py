"""The pre-registered filtering experiment (perf/filtering_experiment.py): its controls are what they claim, its
design cannot change on resume, and its offline recipes are valid and cite DataComp's rules."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from perf import filtering_experiment as FE

ROOT = Path(__file__).resolve().parent.parent


def _truth(tmp_path: Path) -> tuple[Path, list[str]]:
    kinds = ["none"] * 600 + ["caption_swap"] * 100 + ["empty_caption"] * 20 + ["boilerplate"] * 30 + \
        ["non_english"] * 10 + ["ui_glyph"] * 150 + ["exact_dup"] * 60 + ["http_404"] * 30
    uids = [f"{i:032x}" for i in range(len(kinds))]
    p = tmp_path / "truth.parquet"
    pq.write_table(pa.table({"uid": uids, "noise": kinds}), p)
    downloaded = [u for u, k in zip(uids, kinds) if k != "http_404"]
    return p, downloaded


def test_controls_have_the_clip30_size_and_the_noise_they_claim(tmp_path):
    truth, downloaded = _truth(tmp_path)
    c = FE.control_subsets(truth, downloaded)
    k = int(len(downloaded) * 0.3)
    assert {n: len(u) for n, (u, _) in c.items()} == {"oracle": k, "random": k, "adversarial": k}
    noise = dict(zip(*pq.read_table(truth).to_pydict().values()))
    assert all(noise[u] == "none" for u in c["oracle"][0])
    adv = c["adversarial"][0]
    caption_bad = [u for u in downloaded if noise[u] in FE.CAPTION_NOISE]
    assert set(caption_bad) <= set(adv)  # every injected caption-noise row first (160 < k = 291)
    assert all(u in downloaded for name in c for u in c[name][0])  # never a row that did not download
    assert c["adversarial"][1]["noise"]["caption_swap"] == 100
    assert FE.control_subsets(truth, downloaded) == c  # fixed draw: the same subsets every time


def test_the_design_is_locked_on_resume():
    cal = {"admitted": ["a", "b"], "headline_admitted": ["a"], "rule": "r", "seeds": [1000]}
    d = FE.design(cal)
    report = FE.lock_design({}, d, "abc")
    assert report["preregistration"]["digest"] == d["digest"] and report["preregistration"]["commit"] == "abc"
    assert FE.lock_design(report, FE.design(cal), "def")["preregistration"]["commit"] == "abc"  # resume keeps it
    with pytest.raises(SystemExit, match="suite"):
        FE.lock_design(report, FE.design({**cal, "headline_admitted": ["a", "b"]}), "abc")


def test_offline_recipes_load_and_cite_datacomp():
    from curate.filter.recipe import load_recipe

    names = {n for n, (kind, _, _) in FE.ENTRIES.items() if kind == "recipe"}
    files = {p.stem: p for p in (ROOT / "recipes" / "offline").glob("*.yaml")}
    # every entry's recipe exists; a recipe outside the pre-registered entries is named here (match_30pct: scorer
    # v2's match_score, added after the runs; perf/RESULTS.md "The pool matcher")
    assert names <= set(files) and set(files) - names == {"match_30pct"}
    for name, p in files.items():
        r = load_recipe(p)
        assert r.name == name
        assert "DataComp" in p.read_text().split("name:")[0], f"{p.name} must cite the DataComp rule it adapts"


def test_the_confirmatory_design_takes_only_large_admitted_tasks_and_fresh_seeds():
    """perf/confirm_experiment.py: its headline is the admitted tasks with >= 1,000 items (a small task's item noise
    cannot swamp it), its seeds are disjoint from the first run's and the calibration's, and its design is locked."""
    from perf import confirm_experiment as CE

    cal = {"headline_admitted": ["t/big", "t/small"], "rule": "r", "seeds": [1000], "commit": "c",
           "runs": [{"intervals": {"t/big": {"n": 1339}, "t/small": {"n": 189}, "t/other": {"n": 5000}}}]}
    d = CE.design(cal)
    assert d["suite"]["headline"] == ["t/big"] and d["suite"]["evaluated"] == ["t/big", "t/small"]
    assert not set(d["seeds"]) & (set(FE.PREREGISTRATION["seeds"]) | set(cal["seeds"]))
    assert len(d["seeds"]) >= 5
    report = FE.lock_design({}, d, "abc")
    cal["runs"][0]["intervals"]["t/small"]["n"] = 1200  # a different calibration admits a different headline
    with pytest.raises(SystemExit, match="refuses to change"):
        FE.lock_design(report, CE.design(cal), "abc")
    cal["runs"][0]["intervals"]["t/big"]["n"] = 10
    cal["runs"][0]["intervals"]["t/small"]["n"] = 10
    with pytest.raises(SystemExit, match="no calibration-admitted task"):
        CE.design(cal)


def test_the_mrr_design_uses_calibration_v2_fresh_seeds_and_two_holm_families():
    """perf/mrr_experiment.py: headline = the v2-admitted tasks with >= 1,000 items; seeds disjoint from every earlier
    run and calibration; the key and CLIP families are fixed in the design, and a changed design is refused."""
    from perf import confirm_experiment as CE
    from perf import mrr_experiment as X

    cal = {"headline_admitted": ["t/big", "t/small"], "rule": "r2", "seeds": [1001], "commit": "c",
           "runs": [{"intervals": {"t/big": {"n": 1652}, "t/small": {"n": 747}}}]}
    d = X.design(cal, {"comparisons": {}})
    assert d["suite"]["headline"] == ["t/big"] and d["suite"]["evaluated"] == ["t/big", "t/small"]
    earlier = set(FE.PREREGISTRATION["seeds"]) | set(CE.SEEDS) | {1000, 1001}
    assert not set(d["seeds"]) & earlier and set(d["pass2_seeds"]) <= set(d["seeds"])
    assert d["families"]["key"] == ["oracle - no_filter", "adversarial - no_filter"]
    assert d["families"]["clip"] == ["clip_itm_30pct - random", "clip_itm_30pct - no_filter"]
    report = FE.lock_design({}, d, "abc")
    with pytest.raises(SystemExit, match="refuses to change"):
        FE.lock_design(report, X.design(cal, {"comparisons": {"oracle - no_filter": {"diff": 1.0}}}), "abc")
    cal["runs"][0]["intervals"]["t/big"]["n"] = 999
    with pytest.raises(SystemExit, match="no admitted task"):
        X.design(cal, {})


def test_the_match_design_takes_fresh_seeds_every_entry_s_recipe_and_two_holm_families():
    """perf/match_experiment.py: seeds disjoint from all earlier runs and calibrations, the third run's headline,
    recipes that exist and read the named score columns, and a locked design."""
    from perf import confirm_experiment as CE
    from perf import match_experiment as X
    from perf import mrr_experiment as M

    cal = {"headline_admitted": ["t/big", "t/small"], "rule": "r2", "seeds": [1001], "commit": "c",
           "runs": [{"intervals": {"t/big": {"n": 1652}, "t/small": {"n": 747}}}]}
    d = X.design(cal)
    assert d["suite"]["headline"] == ["t/big"] and d["suite"] == M.design(cal, {})["suite"]
    earlier = set(FE.PREREGISTRATION["seeds"]) | set(CE.SEEDS) | set(M.SEEDS) | {1000, 1001}
    assert len(d["seeds"]) == 5 and not set(d["seeds"]) & earlier
    assert d["families"]["match"] == ["match_30pct - no_filter", "match_30pct - random",
                                      "match_30pct - clip_itm_30pct"]
    from curate.filter.recipe import load_recipe

    for name, column in (("match_30pct", "match_score"), ("clip_itm_30pct", "itm_score")):
        step = load_recipe(ROOT / "recipes" / "offline" / f"{name}.yaml").steps[0]
        assert step.params.column == column and step.params.keep_top_fraction == FE.FRACTION
    report = FE.lock_design({}, d, "abc")
    with pytest.raises(SystemExit, match="refuses to change"):
        FE.lock_design(report, X.design({**cal, "rule": "other"}), "abc")
