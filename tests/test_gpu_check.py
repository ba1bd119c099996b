"""perf/gpu_check.py's code paths on the CPU at tiny sizes (`--device cpu --quick`): every row is
present with a positive rate, and every near-duplicate search path (torch exact, torch IVF, faiss flat,
faiss IVF) finds the same planted pairs. Missing libraries turn rows into "skipped", never an error.
CI cost: ~25 s (two short training processes dominate)."""

from __future__ import annotations

import json

from perf import gpu_check as G


def test_cpu_quick_runs_every_row(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert G.main(["--device", "cpu", "--quick", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = {r["row"]: r for r in res["rows"]}
    assert list(rows) == list(G.ROWS)
    for name, r in rows.items():
        assert r["status"] == "ok", (name, r["note"])
        assert r["rate"] > 0 and r["unit"] and r["backend"], name
    s = res["search"]
    assert s["pairs_agree"] and set(s["pairs"]) == {n for n in G.ROWS if n.startswith("dedup_")}
    assert all(v == s["planted"] for v in s["pairs"].values())  # exactly the planted near-copies
    table = capsys.readouterr().out
    assert all(n in table for n in G.ROWS) and "search paths agree: True" in table


def test_missing_libraries_are_skipped_and_named(monkeypatch):
    real = G.have
    monkeypatch.setattr(G, "have", lambda m: False if m in ("faiss", "open_clip") else real(m))
    rows, info = G.check_search(G.QUICK, "cpu")
    by = {r.row: r for r in rows}
    assert by["dedup_exact_faiss"].status == by["dedup_ivf_faiss"].status == "skipped"
    assert "faiss not installed" in by["dedup_ivf_faiss"].note
    assert by["dedup_exact_torch"].rate > 0 and info["pairs_agree"]
    km = {r.row: r for r in G.check_kmeans(G.QUICK, "cpu")}
    assert km["kmeans_faiss"].status == "skipped" and km["kmeans_torch"].rate > 0
    model, backend = G.vit_b32("cpu")
    assert model is not None and "open_clip not installed" in backend
