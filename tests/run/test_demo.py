"""`curate demo` at the debug scale: scorer v2 (itm) feeds the CLIP-score recipes, the leaderboard shows intervals
and chance levels, demo.json records the scorer, and a finished demo re-runs without retraining anything.

The offline pool build and the img2dataset download are replaced by a 160-row pool in the downloaded-pool format
(tests/pool_factory.py) with a truth sidecar: both stages have their own tests (tests/pool/), and the real small
pool would cost minutes of CPU. The evaluation suite is capped at 40 samples per task for the same reason.
Everything after the download (train-scorer, filter, reshard, train, evaluate, submit, leaderboard) is the real
code.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.core import atomic
from tests.pool_factory import make_pool

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# dedup_clip_itm_30pct costs a third training run and, at the debug scale, keeps almost nothing (a barely trained
# CLIP's image embeddings are crowded); its wiring is checked by test_dedup_recipe_reads_both_scorer_outputs
RECIPES = ["no_filter", "clip_itm_30pct"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo's first run and a second run of the finished demo, with their printed output."""
    import benchmark.evalsets as E
    import curate.pool.download as D
    import curate.pool.offline.build as B
    from click.testing import CliRunner

    from curate.cli import main

    mp = pytest.MonkeyPatch()
    work = tmp_path_factory.mktemp("demo") / "work"
    fp = make_pool(work / "pool", n_shards=2, per_shard=80, corrupt=0, failed=2)
    atomic.write_json(work / "pool" / "pool.json", {"state": "complete"})  # the demo serves nothing then
    n = len(fp.all_uids)
    source = ["tuxpaint" if i % 4 else "openclipart" for i in range(n)]
    noise = ["caption_swap" if i % 7 == 0 else ("exact_dup" if i % 11 == 0 else "none") for i in range(n)]
    atomic.write_parquet(work / "pool_build" / "truth.parquet",
                         pa.table({"uid": fp.all_uids, "source": source, "noise": noise}))
    calls: list[str] = []

    def fake_build(cfg):
        assert Path(cfg.out) == work / "pool_build"
        calls.append("build")
        return {"rows": n, "up_to_date": True}

    def fake_download(cfg):
        assert Path(cfg.out) == work / "pool" and Path(cfg.urls) == work / "pool_build" / "urls.parquet"
        calls.append("download")
        return {"counts": {"success": len(fp.success_uids())}, "up_to_date": True}

    real_evalsets = E.build_offline
    mp.setattr(B, "build_offline", fake_build)
    mp.setattr(D, "download", fake_download)
    # Fashion-MNIST and digits, 40 samples each (the pool tasks need a real pool build)
    mp.setattr(E, "build_offline", lambda c: real_evalsets(dataclasses.replace(c, pool_dir=None, limit=40)))
    args = ["demo", "--work", str(work), "--scale", "debug", "--port", "0", "--device", "cpu", "--workers", "0",
            "--no-progress", *[a for r in RECIPES for a in ("--recipe", r)]]
    try:
        first = CliRunner().invoke(main, args, catch_exceptions=False)
        first_s = json.loads((work / "demo.json").read_text())
        # the scorer's checkpoint, head, embeddings and itm_score files: none may be rewritten by the re-run
        kept = [work / "scorer_itm.pt", work / "scorer_itm.itm.pt", *sorted((work / "pool" / "embeddings").rglob("*"))]
        stamps = {p: p.stat().st_mtime_ns for p in kept if p.is_file()}
        second = CliRunner().invoke(main, args, catch_exceptions=False)
        second_s = json.loads((work / "demo.json").read_text())
    finally:
        mp.undo()
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    return {"work": work, "fp": fp, "first": first_s, "second": second_s, "first_out": first.output,
            "second_out": second.output, "stamps": stamps, "calls": calls}


def test_demo_trains_scorer_v2_and_records_its_held_out_aucs(demo_run):
    work, s = demo_run["work"], demo_run["first"]
    assert s["failed_recipes"] == {}
    rec = json.loads((work / "demo.json").read_text())["scorer"]
    assert rec["variant"] == "itm" and rec["arch"] == "curate-debug"
    assert rec["scores_model_id"].startswith("curate-debug-itm__") and Path(rec["itm_head"]).is_file()
    itm_kinds = rec["report"]["columns"]["itm_score"]["kinds"]
    assert set(itm_kinds) == {"caption_swap", "exact_dup"}  # every recorded noise kind, not only swaps
    swap = itm_kinds["caption_swap"]
    assert 0.0 <= swap["auc"] <= 1.0 and swap["random_auc"] is not None and swap["n_noisy"] > 0
    assert rec["check"] == swap and rec["report"]["heldout_excluded_from_training"] is True
    assert "clip_score" in rec["report"]["columns"]  # the bootstrapped CLIP's cosine, labelled by its column
    assert f"itm_score separates clean pairs from swapped captions with ROC AUC {swap['auc']:.3f} on held-out rows" \
        in demo_run["first_out"]
    assert re.search(r"itm_score\s+exact_dup\s+\d\.\d{3}\s+\(random", demo_run["first_out"])
    assert rec["seconds"]["pretrain"] is not None and rec["seconds"]["itm_head"] is not None


def test_the_clip_score_recipes_keep_the_top_30_percent_by_itm_score(demo_run):
    import numpy as np

    work, fp = demo_run["work"], demo_run["fp"]
    rec = demo_run["first"]["scorer"]
    scores = pq.read_table(work / "pool" / "embeddings" / rec["scores_model_id"]).to_pylist()
    ranked = [r["uid"] for r in sorted(scores, key=lambda r: (-r["itm_score"], r["uid"]))]
    sub = work / "subsets" / "clip_itm_30pct"
    man = json.loads((sub / "manifest.json").read_text())
    steps = man["counts"]["steps"]
    assert [st["filter"] for st in steps] == ["pool", "score"]
    assert rec["scores_model_id"] in man["model_ids"]
    assert "column: itm_score" in man["recipe_text"] and "model: curate-debug-itm" in man["recipe_text"]
    # the ledger: every downloaded row reaches the score step, judged on its itm_score; the top 30% are kept
    led = [r for r in pq.read_table(sub / "decisions.parquet").to_pylist() if r["step"] == steps[-1]["step"]]
    assert len(led) == steps[-1]["in"] == len(fp.success_uids())
    kept = {r["uid"] for r in led if r["kept"]}
    assert len(kept) == int(np.floor(len(led) * 0.3)) and kept == set(ranked[:len(kept)])
    by_uid = {r["uid"]: r["itm_score"] for r in scores}
    assert all(abs(r["score"] - by_uid[r["uid"]]) < 1e-6 for r in led)


def test_dedup_recipe_reads_both_scorer_outputs(demo_run):
    """The dedup recipe the demo wrote: dedup on the bootstrapped CLIP's embeddings, then the same itm_score rule."""
    from curate.filter.recipe import load_recipe, resolve_models
    from curate.pool.pool import Pool
    from curate.run.demo import DEMO_RECIPES

    path = demo_run["work"] / "dedup.yaml"
    atomic.write_text(path, DEMO_RECIPES["dedup_clip_itm_30pct"].replace("model: curate-tiny", "model: curate-debug"))
    recipe = load_recipe(path)
    rec = demo_run["first"]["scorer"]
    # the weights the demo passes (`pretrained` in curate/run/demo.py) select the scorer's two folders
    resolve_models(recipe, Pool.open(demo_run["work"] / "pool"),
                   {rec["arch"]: rec["out"], f"{rec['arch']}-itm": rec["itm_head"]})
    steps = recipe.steps
    assert [st.name for st in steps] == ["dedup", "score"], steps
    assert steps[0].model_id == rec["model_id"] and steps[1].model_id == rec["scores_model_id"]
    assert steps[1].params.column == "itm_score" and steps[1].params.keep_top_fraction == 0.3


def test_the_printed_leaderboard_shows_intervals_and_chance_levels(demo_run):
    work, s = demo_run["work"], demo_run["first"]
    table = s["table"]
    assert "95% interval" in table.splitlines()[0]
    rows = [ln for ln in table.splitlines() if any(f" {r} " in f" {ln} " for r in RECIPES)]
    assert len(rows) == len(RECIPES)
    for ln in rows:  # one seed: the item-level bootstrap interval of that model
        assert re.search(r"\[\d\.\d{4}, \d\.\d{4}\] items", ln), ln
    m = re.search(r"chance level \(main metric\): (.*); of the average over the (\d+) tasks: (\d\.\d{4})", table)
    assert m and "digits" in m.group(1), table
    assert table in demo_run["first_out"] and "scorer v2 check" in demo_run["first_out"]
    page = Path(s["html"]).read_text()
    assert "95% interval" in page and "Chance levels" in page


def test_a_finished_demo_reruns_without_training(demo_run):
    s2 = demo_run["second"]
    assert [r["status"] for r in s2["stages"]] == ["up_to_date"] * len(s2["stages"]), s2["stages"]
    assert any(r["stage"].startswith("train-scorer v2") for r in s2["stages"])
    assert all(p.stat().st_mtime_ns == t for p, t in demo_run["stamps"].items())
    assert s2["scorer"]["check"] == demo_run["first"]["scorer"]["check"]
    assert demo_run["calls"] == ["build", "download"] * 2
