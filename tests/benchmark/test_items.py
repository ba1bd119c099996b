"""Per-item results: `curate evaluate` writes, per task, what each item scored, and every reported metric
(accuracy, acc@5, mean per-class recall, worst-group accuracy top-1 and top-5, F1-macro, retrieval R@k both
ways, WinoGAViL Jaccard) is recomputed from the item file exactly; old results without item files say how
to write them."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from benchmark import evalsets as E
from benchmark import metrics as M
from benchmark import stats as S
from benchmark.evaluate import (
    EvalConfig, evaluate, items_path, main_metric_cells, metrics_from_items, read_items, read_results,
)
from benchmark.tasks import TASKS
from curate.core.errors import CurateError
from tests.run_factory import checkpoint_run, random_checkpoint

ARCH = "curate-debug"
COLORS = [(220, 20, 20), (20, 200, 20), (20, 20, 220), (250, 250, 250), (5, 5, 5), (230, 230, 20),
          (20, 220, 220), (250, 150, 200), (128, 128, 128), (250, 140, 10)]
NAMES = ["red", "green", "blue", "white", "black", "yellow", "cyan", "pink", "grey", "orange"]
# one task per metric type (main metric in brackets)
TASK_KEYS = ["cifar10",                 # acc1 (+ acc5, mean per-class recall reported)
             "vtab/caltech101",         # mean_per_class_recall
             "wilds/fmow",              # acc_worst_region (top-1, region 5 excluded)
             "fairness/dollar_street",  # acc_top5_wg (top-5 worst income group)
             "wilds/iwildcam",          # F1-macro_all
             "retrieval/mscoco_2014_5k_test_image_text_retrieval",  # mean_recall@1 (+ R@5, R@10 both ways)
             "misc/winogavil"]          # jaccard_score_10-12


def _png(rgb, jitter, rng) -> bytes:
    c = tuple(int(v) for v in np.clip(np.array(rgb) + rng.integers(-jitter, jitter + 1, 3), 0, 255))
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), c).save(buf, format="PNG")
    return buf.getvalue()


def _npy(row) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(row, dtype=np.int64))
    return buf.getvalue()


def _classification(n, n_classes, rng, meta=None):
    out = []
    for i in range(n):
        y = int(rng.integers(0, n_classes))
        s = {"__key__": f"{i:04d}", "png": _png(COLORS[y], 60, rng), "cls": str(y)}
        if meta is not None:
            s["npy"] = _npy(meta(i, y))
        out.append(s)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("items")
    rng = np.random.default_rng(3)
    ev = root / "evalsets"
    tmpl = ["a photo of {c}.", "a {c} square."]
    E.write_evalset(ev / TASKS["cifar10"].folder, _classification(40, 10, rng), NAMES, tmpl)
    E.write_evalset(ev / TASKS["vtab/caltech101"].folder, _classification(40, 10, rng), NAMES, tmpl)
    E.write_evalset(ev / TASKS["wilds/fmow"].folder,
                    _classification(48, 4, rng, meta=lambda i, y: [i % 6, 2016, y]), NAMES[:4], tmpl)
    E.write_evalset(ev / TASKS["fairness/dollar_street"].folder,
                    _classification(40, 10, rng, meta=lambda i, y: [i % 4, 0, 0]), NAMES, tmpl)
    E.write_evalset(ev / TASKS["wilds/iwildcam"].folder, _classification(40, 6, rng), NAMES[:6], tmpl)
    ret = []
    for i in range(24):
        y = i % 10
        caps = [f"a {NAMES[y]} square", f"something {NAMES[y]}", f"picture {i}"][: 1 + i % 3]
        ret.append({"__key__": f"{i:04d}", "png": _png(COLORS[y], 40, rng), "txt": "\n".join(caps)})
    E.write_evalset(ev / TASKS["retrieval/mscoco_2014_5k_test_image_text_retrieval"].folder, ret, None, None,
                    dataset_type="retrieval")
    wino = []
    for i in range(12):
        n_c = [5, 6, 10, 12][i % 4]
        cands = [NAMES[j % 10] + ("" if j < 10 else " x") for j in range(n_c)]
        assoc = [cands[j] for j in rng.choice(n_c, size=1 + i % 3, replace=False)]
        s = {"__key__": f"{i:04d}", "json": json.dumps({"cue": f"cue{i}", "candidates": cands, "associations": assoc})}
        for j in range(n_c):
            s[f"{j}.png"] = _png(COLORS[j % 10], 30, rng)
        wino.append(s)
    E.write_evalset(ev / TASKS["misc/winogavil"].folder, wino, None, None, dataset_type="winogavil")

    ckpt = random_checkpoint(root / "model.pt", seed=0, arch=ARCH)
    run = checkpoint_run(root / "run", ckpt, ARCH)
    summary = evaluate(EvalConfig(run=run, evalsets=ev, tasks=TASK_KEYS, num_workers=0, progress=False))
    return {"root": root, "run": run, "evalsets": ev, "ckpt": ckpt, "summary": summary}


@pytest.mark.parametrize("key", TASK_KEYS)
def test_item_file_recomputes_every_reported_metric_exactly(world, key):
    out = world["run"] / "eval_results.jsonl"
    rec = read_results(out)[key]
    items, meta = read_items(out, key, model_id=rec["model_id"])
    assert meta["task"] == key and meta["model_id"] == rec["model_id"] and meta["main_metric"] == rec["main_metric"]
    assert meta["evalset_fingerprint"] == rec["evalset_fingerprint"] and len(rec["evalset_fingerprint"]) == 16
    assert len(items["key"]) == rec["n"] == meta["n"]
    recomputed = metrics_from_items(TASKS[key], items, meta)
    assert recomputed == rec["metrics"]  # exact equality, every metric the evaluator reported
    assert rec["metrics"][rec["main_metric"]] is not None
    # the cells benchmark.stats resamples give the main metric too (up to float summation order)
    stat, cols = main_metric_cells(TASKS[key], items)
    assert len(cols) == rec["n"]
    assert S.TaskCells.of(stat, cols).estimate == pytest.approx(rec["metrics"][rec["main_metric"]], abs=1e-12)


def test_item_files_are_compact_typed_parquet(world):
    out = world["run"] / "eval_results.jsonl"
    p = items_path(out, "wilds/fmow")
    assert p.parent.name == "eval_results.items" and p.name == "wilds--fmow.parquet"
    schema = pq.read_schema(p)
    assert {f.name: str(f.type) for f in schema} == {"key": "string", "target": "int32", "pred": "int32",
                                                     "rank": "int32", "group": "int32"}
    assert pq.ParquetFile(p).metadata.row_group(0).column(1).compression == "ZSTD"
    r = pq.read_schema(items_path(out, "retrieval/mscoco_2014_5k_test_image_text_retrieval"))
    assert pa.types.is_list(r.field("caption_ranks").type) and str(r.field("caption_ranks").type.value_type) == "int32"
    items, _ = read_items(out, "retrieval/mscoco_2014_5k_test_image_text_retrieval")
    assert len(items["caption_ranks"]) == items["n_captions"].sum() == 48  # 24 images with 1-3 captions


def test_fingerprint_is_content_not_location(world, tmp_path):
    """The same sets copied elsewhere give the same fingerprints; a changed label changes it."""
    ev2 = tmp_path / "ev2"
    shutil.copytree(world["evalsets"], ev2)
    s = evaluate(EvalConfig(model=ARCH, pretrained=str(world["ckpt"]), evalsets=ev2, tasks=["cifar10", "iwildcam"],
                            out=tmp_path / "r.jsonl", num_workers=0, progress=False))
    base = world["summary"]["results"]
    for k in ("cifar10", "wilds/iwildcam"):
        assert s["results"][k]["evalset_fingerprint"] == base[k]["evalset_fingerprint"]
    with open(ev2 / TASKS["cifar10"].folder / "classnames.txt", "a") as fh:  # an extra class changes the task
        fh.write("purple\n")
    s2 = evaluate(EvalConfig(model=ARCH, pretrained=str(world["ckpt"]), evalsets=ev2, tasks=["cifar10"],
                             out=tmp_path / "r2.jsonl", num_workers=0, progress=False))
    assert s2["results"]["cifar10"]["evalset_fingerprint"] != base["cifar10"]["evalset_fingerprint"]


def test_old_results_without_items_say_how_to_rewrite_them(world, tmp_path):
    from curate.cli import main

    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    shutil.rmtree(run / "eval_results.items")  # as a RUN evaluated before per-item files existed
    with pytest.raises(CurateError, match=r"task cifar10 has no per-item results .*"
                                          r"curate evaluate --run .*run --tasks cifar10 --force"):
        read_items(run / "eval_results.jsonl", "cifar10")
    r = CliRunner().invoke(main, ["evaluate", "--run", str(run), "--evalsets", str(world["evalsets"]),
                                  "--tasks", "cifar10,iwildcam", "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert "2 reused task(s) have no per-item results" in r.output
    assert f"curate evaluate --run {run} --tasks cifar10,wilds/iwildcam --force" in r.output
    # the suggested command writes them, with unchanged scores
    before = read_results(run / "eval_results.jsonl")
    s = evaluate(EvalConfig(run=run, evalsets=world["evalsets"], tasks=["cifar10", "iwildcam"], force=True,
                            num_workers=0, progress=False))
    assert s["no_items"] == [] and set(s["computed"]) == {"cifar10", "wilds/iwildcam"}
    for k in ("cifar10", "wilds/iwildcam"):
        assert s["results"][k]["metrics"] == before[k]["metrics"]
        items, meta = read_items(run / "eval_results.jsonl", k, model_id=before[k]["model_id"])
        assert metrics_from_items(TASKS[k], items, meta) == before[k]["metrics"]
    # item files of another model are refused, not mixed
    with pytest.raises(CurateError, match="per-item results of model"):
        read_items(run / "eval_results.jsonl", "cifar10", model_id="other__abc")


def test_ranks_follow_topk_tie_rule():
    """Integer scores make many ties: ranks reproduce topk_accuracy and retrieval_recall for every k."""
    rng = np.random.default_rng(0)
    logits = rng.integers(0, 4, size=(300, 12)).astype(np.float32)
    target = rng.integers(0, 12, size=300)
    rank = M.true_class_rank(logits, target, chunk=64)
    for k in (1, 2, 5, 12, 20):
        assert float((rank < k).mean()) == M.topk_accuracy(logits, target, k)
    sim = rng.integers(0, 3, size=(70, 30)).astype(np.float32)
    t2i = np.sort(rng.integers(0, 29, size=70))  # image 29 has no caption
    ranks = M.retrieval_ranks(sim, t2i, chunk=16)
    ks = (1, 2, 5, 10, 40)
    assert M.retrieval_recall_from_ranks(ranks["caption_image_rank"], ranks["image_caption_rank"], ks) == \
        M.retrieval_recall(sim, t2i, ks)
    assert ranks["image_caption_rank"][29] == -1


def test_compare_two_evaluated_runs_item_by_item(world, tmp_path):
    """Two real evaluations (different weights, same eval sets): compare aligns their item files and gives
    an item-level interval for every metric type, and no recipe verdict with one seed each."""
    from benchmark import compare as C

    run2 = checkpoint_run(tmp_path / "run2", random_checkpoint(tmp_path / "m2.pt", seed=1, arch=ARCH), ARCH)
    keys = ["cifar10", "vtab/caltech101", "wilds/fmow", "wilds/iwildcam",
            "retrieval/mscoco_2014_5k_test_image_text_retrieval", "misc/winogavil"]
    evaluate(EvalConfig(run=run2, evalsets=world["evalsets"], tasks=keys, num_workers=0, progress=False))
    rep = C.compare(C.load_paths(str(world["run"])), [C.load_paths(str(run2))], draws=500)[0]
    assert rep["mode"] == "items" and set(rep["tasks"]) == set(keys) and not [n for n in rep["notes"] if not n.startswith(("one seed per side", "pool completeness unknown"))]
    assert set(rep["not_compared"]) == {"fairness/dollar_street"}  # scored by run 1 only
    for r in rep["rows"]:
        assert r["low"] is not None and r["low"] <= r["diff"] <= r["high"], r
    assert rep["verdict"].startswith("seed variance unknown (one seed per side): no recipe verdict")


@pytest.mark.parametrize("key,mm", [("cifar10", "mrr"), ("retrieval/mscoco_2014_5k_test_image_text_retrieval",
                                                          "mean_mrr")])
def test_mrr_item_cells_give_the_reported_mrr(world, key, mm):
    """Suite v2's main metric (MRR) resamples from the same item files: the cells' estimate is the reported value,
    and its interval is a bootstrap (not a Wilson interval: reciprocal ranks are not 0/1)."""
    import dataclasses

    out = world["run"] / "eval_results.jsonl"
    rec = read_results(out)[key]
    items, meta = read_items(out, key, model_id=rec["model_id"])
    task = dataclasses.replace(TASKS[key], main_metric=mm)
    stat, cols = main_metric_cells(task, items)
    cells = S.TaskCells.of(stat, cols)
    assert cells.estimate == pytest.approx(rec["metrics"][mm], abs=1e-12)
    assert 0 < rec["metrics"][mm] <= 1
    iv = S.task_interval(cells, seed=0)
    assert iv.low <= iv.estimate <= iv.high and "bootstrap" in iv.method


def test_an_old_line_keeps_its_own_main_metric_for_item_statistics(world):
    """A result line scored before its task's main metric changed (suite v2 -> MRR) is resampled by the metric its
    value is: the leaderboard's item cells give the line's own value back, not the registry's newer metric."""
    from benchmark.evaluate import task_as_scored
    from benchmark.leaderboard import item_cells

    out = world["run"] / "eval_results.jsonl"
    rec = read_results(out)["cifar10"]
    assert task_as_scored(TASKS["cifar10"], rec) is TASKS["cifar10"]
    old = {**rec, "main_metric": "mrr"}  # as if the registry had moved on from the metric this line names
    assert task_as_scored(TASKS["cifar10"], old).main_metric == "mrr"
    cells, _ = item_cells(out, [old])
    assert cells["cifar10"].estimate == pytest.approx(rec["metrics"]["mrr"], abs=1e-12)
