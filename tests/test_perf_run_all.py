"""perf/run_all.py's bookkeeping on fake inputs: results.json schema, comparison, RESULTS.md rewriting.

No benchmark runs here (they take minutes and load the machine; `make perf` runs them). The bench
runner itself is exercised with a stand-in module that writes a result in perf/result.py's shape."""

from __future__ import annotations

import json

import pytest

from perf import run_all as R
from perf.result import bench_result


def _entry(name: str, ratio: float | None, quick: bool = True, high: bool = False) -> dict:
    return {"name": name, "command": f"python -m perf.bench_{name} --quick", "status": "ok", "quick": quick,
            "wall_s": 10.0, "cpu_s": 15.0, "load_start": 0.5, "load_end": 3.5 if high else 0.7, "high_load": high,
            "figure": 2.0, "baseline": 1.0, "ratio": ratio, "unit": "rows/s", "baseline_name": "ref", "goal": "x"}


def _results(rows: list[dict], previous: dict | None = None) -> dict:
    res = {"schema": R.SCHEMA, "created": "2026-12-01T20:00:00Z", "git": {"commit": "abc123def4567", "dirty": True},
           "machine": {"cpus": 2, "platform": "linux", "python": "3.11"}, "quick": True, "load_start": 0.5,
           "load_end": 0.7, "results": rows}
    res["comparison"] = R.compare(previous, res)
    return res


def test_results_schema_is_validated():
    res = _results([_entry("train", 1.1)])
    R.validate(res)
    json.loads(json.dumps(res))  # JSON-able
    bad = {k: v for k, v in res.items() if k != "git"}
    with pytest.raises(ValueError, match="git"):
        R.validate(bad)
    broken = _results([{k: v for k, v in _entry("train", 1.1).items() if k != "cpu_s"}])
    with pytest.raises(ValueError, match="cpu_s"):
        R.validate(broken)


def test_comparison_flags_regressions_and_incomparable_runs():
    prev = _results([_entry("train", 1.2), _entry("reshard", 1.5), _entry("gone", 1.0)])
    cur = _results([_entry("train", 1.0), _entry("reshard", 1.6, high=True), _entry("new", 2.0)], prev)
    by = {c["name"]: c for c in cur["comparison"]}
    assert set(by) == {"train", "reshard"}  # only benches present in both runs
    assert by["train"]["regressed"] and by["train"]["change"] == pytest.approx(-0.167, abs=1e-3)
    assert by["train"]["comparable"]
    assert not by["reshard"]["regressed"] and not by["reshard"]["comparable"]  # high load on one side
    assert R.compare(None, cur) == []


def test_high_load_is_relative_to_the_core_count():
    assert not R.high_load(1.5, 1.9, cores=2)
    assert R.high_load(0.2, 2.5, cores=2) and R.high_load(9.0, 0.1, cores=8)


def test_results_md_section_is_replaced_between_markers_and_nothing_else_changes():
    hand = "# Performance results\n\nHand-written analysis, with a table:\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
    res = _results([_entry("train", 1.11), _entry("stats", None)])
    once = R.rewrite_results_md(hand, R.render_section(res))
    assert once.startswith(hand) and once.count(R.BEGIN) == 1 and once.count(R.END) == 1
    assert "`train`" in once and "1.11x" in once and "abc123def456" in once and "python -m perf.bench_train" in once
    tail = "\n## Later hand-written section\n\nmore text\n"
    edited = once + tail
    res2 = _results([_entry("train", 1.3, high=True)], res)
    twice = R.rewrite_results_md(edited, R.render_section(res2))
    assert twice.count(R.BEGIN) == 1 and twice.endswith(tail) and twice.startswith(hand)
    section = twice[twice.index(R.BEGIN): twice.index(R.END)]
    assert "1.30x" in section and "1.11x" not in section.split("previous")[0].split("Commands")[0]
    assert "*high load*" in section and "+17%" in section
    with pytest.raises(ValueError, match="markers"):
        R.rewrite_results_md(hand + R.BEGIN + "\n", "x")


def test_normalise_reads_the_side_by_side_summaries():
    dc = {"rows": 1280000, "reference": {"wall_s": 6.0, "cpu_s": 9.0, "peak_rss_gb": 0.5},
          "filter": {"wall_s": 3.0, "cpu_s": 4.5, "peak_rss_gb": 0.4}}
    n = R.normalise("filter_datacomp_clip_l14_30pct", dc)
    assert n["ratio"] == 2.0 and n["details"]["memory_ratio"] == 0.8 and n["details"]["cpu_ratio"] == 2.0
    r = bench_result("train", 300.0, 270.0, "samples/s", baseline_name="open_clip_train.main")
    assert R.normalise("train", r) is r and r["ratio"] == pytest.approx(1.111, abs=1e-3)
    t = bench_result("dedup", 10.0, 1000.0, "CPU s", higher_is_better=False)
    assert t["ratio"] == 100.0
    with pytest.raises(ValueError):
        R.normalise("x", {"something": 1})


def test_run_bench_measures_a_child_and_records_its_result(tmp_path, monkeypatch):
    mod = tmp_path / "fake_bench_mod.py"
    mod.write_text("import argparse, json\nfrom perf.result import bench_result, write\n"
                   "ap = argparse.ArgumentParser(); ap.add_argument('--quick', action='store_true'); ap.add_argument('--json')\n"
                   "a = ap.parse_args(); sum(range(10**6))\n"
                   "write(a.json, bench_result('fake', 3.0, 2.0, 'rows/s', baseline_name='ref'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(R, "REPO", tmp_path)
    b = R.Bench("fake", "fake_bench_mod", ["--quick"], [], "goal")
    # run_bench sets PYTHONPATH to REPO: the stand-in module and perf/ must both be importable there
    (tmp_path / "perf").symlink_to(R.Path(R.__file__).parent)
    (tmp_path / "curate").symlink_to(R.Path(R.__file__).parents[1] / "curate")
    e = R.run_bench(b, quick=True, cores=2)
    assert e["status"] == "ok", e
    assert e["ratio"] == 1.5 and e["figure"] == 3.0 and e["cpu_s"] > 0 and e["wall_s"] > 0
    assert e["command"] == "python -m fake_bench_mod --quick"
    failing = R.Bench("bad", "fake_bench_missing", [], [], "goal")
    f = R.run_bench(failing, quick=True, cores=2)
    assert f["status"] == "failed" and "No module named" in f["log_tail"]
