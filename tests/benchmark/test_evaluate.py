"""`curate evaluate` end to end on a tiny local model: results file, missing tasks, resume, groups,
corrupt images, and parity with clip_benchmark (DataComp's own evaluation library)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from benchmark import evalsets as E
from benchmark.evaluate import EvalConfig, evaluate, read_results
from benchmark.tasks import DATACOMP_SCORED, OFFLINE_KEYS, TASKS
from tests.run_factory import checkpoint_run, random_checkpoint
from tests.benchmark.test_evalsets import make_pool_evalsets

ARCH = "curate-debug"


def _png(rgb, size=(20, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def _save_random_model(path: Path, seed: int) -> Path:
    return random_checkpoint(path, seed, ARCH)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A checkpoint, a RUN folder as benchmark/train.py writes it, and an evalsets folder with the
    offline suite (digits + pool held-out splits), one DataComp-named task (mnist, from digits), a
    WILDS task with region metadata, and a set with a corrupt image."""
    root = tmp_path_factory.mktemp("eval")
    ckpt = _save_random_model(root / "model.pt", seed=0)
    run = checkpoint_run(root / "run", ckpt, ARCH)

    ev = root / "evalsets"
    pool = make_pool_evalsets(root / "pool", n_per_class=6)
    E.build_offline(E.BuildOfflineConfig(out=ev, pool_dir=pool, limit=150))
    # "mnist" in DataComp's layout, from the real sklearn digits
    shutil.copytree(ev / TASKS["offline/digits"].folder, ev / TASKS["mnist"].folder)
    # FMoW-like: 3 colours as classes, region metadata [region, year, y]; region 5 = "Other"
    rng = np.random.default_rng(0)
    colors = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
    samples = []
    for i in range(48):
        y = i % 4
        meta = np.array([i % 6, 2016, y], dtype=np.int64)
        buf = io.BytesIO()
        np.save(buf, meta)
        jitter = tuple(int(v) for v in np.clip(np.array(colors[y]) + rng.integers(-30, 30, 3), 0, 255))
        samples.append({"__key__": f"{i:04d}", "png": _png(jitter), "cls": str(y), "npy": buf.getvalue()})
    E.write_evalset(ev / TASKS["wilds/fmow"].folder, samples, ["red", "green", "blue", "yellow"],
                    ["a photo of something {c}.", "a {c} square."])
    # a set with one corrupt image among good ones
    bad = [{"__key__": f"{i:04d}", "png": _png(colors[i % 2]), "cls": str(i % 2)} for i in range(6)]
    bad.insert(3, {"__key__": "corrupt", "png": b"\x89PNG\r\n\x1a\ngarbage", "cls": "0"})
    E.write_evalset(ev / TASKS["vtab/svhn"].folder, bad, [str(i) for i in range(10)], ["the number {c}."])
    return {"root": root, "ckpt": ckpt, "run": run, "evalsets": ev}


def test_run_writes_results_reports_missing_and_resumes(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    cfg = EvalConfig(run=run, evalsets=world["evalsets"], batch_size=32, num_workers=0, progress=False)
    s = evaluate(cfg)
    out = run / "eval_results.jsonl"
    present = set(OFFLINE_KEYS) | {"mnist", "wilds/fmow", "vtab/svhn"}
    assert set(s["computed"]) == present
    assert set(s["missing"]) == set(DATACOMP_SCORED) - present  # absent data -> missing, never 0
    assert set(s["skipped"]) == {"fairness/fairface", "fairness/utkface"}

    recs = read_results(out)
    assert set(recs) == present  # missing tasks have no line at all
    df = pd.read_json(out, lines=True)
    assert {"key", "dataset", "main_metric", "metrics", "n"} <= set(df.columns)
    assert recs["offline/digits"]["n"] == 150 and recs["mnist"]["n"] == 150
    assert recs["offline/emoji_category"]["n"] == 18
    assert recs["offline/tuxpaint_retrieval"]["metrics"]["mean_recall@1"] is not None
    for r in recs.values():
        v = r["metrics"][r["main_metric"]]
        assert 0.0 <= v <= 1.0

    agg = s["aggregates"]
    assert agg["datacomp"]["n_tasks"] == 3 and agg["datacomp"]["n_total"] == 38 and not agg["datacomp"]["complete"]
    mains = [recs[k]["metrics"][recs[k]["main_metric"]] for k in ("mnist", "wilds/fmow", "vtab/svhn")]
    assert agg["datacomp"]["average"] == pytest.approx(np.mean(mains))
    assert agg["offline"]["complete"] and agg["offline"]["n_tasks"] == 5
    summary = json.loads((run / "eval_summary.json").read_text())
    assert len(summary["aggregates"]["datacomp"]["missing"]) == 35

    # resume: nothing recomputed, file unchanged
    before = out.read_bytes()
    s2 = evaluate(cfg)
    assert s2["computed"] == [] and set(s2["reused"]) == present and out.read_bytes() == before
    # a task removed from the file (e.g. killed before it was written) is the only one recomputed
    lines = [ln for ln in out.read_text().splitlines() if '"offline/digits"' not in ln]
    out.write_text("\n".join(lines) + "\n")
    s3 = evaluate(cfg)
    assert s3["computed"] == ["offline/digits"]
    assert read_results(out)["offline/digits"]["metrics"] == recs["offline/digits"]["metrics"]
    # new weights are never mixed with the old model's scores
    _save_random_model(run / "final.pt", seed=1)
    s4 = evaluate(EvalConfig(run=run, evalsets=world["evalsets"], tasks=["offline/digits"], num_workers=0,
                             progress=False))
    assert s4["computed"] == ["offline/digits"] and set(read_results(out)) == {"offline/digits"}


def test_corrupt_image_is_recorded_not_fatal(world, tmp_path, monkeypatch):
    monkeypatch.setattr(E, "SMALL_SET_BYTES", 0)  # decode in a DataLoader worker process, as big sets do
    s = evaluate(EvalConfig(model=ARCH, pretrained=str(world["ckpt"]), tasks=["svhn"], evalsets=world["evalsets"],
                            out=tmp_path / "r.jsonl", num_workers=1, progress=False))
    rec = s["results"]["vtab/svhn"]
    assert rec["n"] == 6 and rec["n_failed"] == 1
    assert rec["failed"][0]["key"] == "corrupt" and "undecodable image" in rec["failed"][0]["error"]


def _reference_features(world, task_key):
    """Image features, labels and metadata computed without our loader: PIL + open_clip directly."""
    import torch
    import webdataset as wds

    from curate.clip.models import load_model

    lm = load_model(ARCH, str(world["ckpt"]), "cpu")
    es = E.open_evalset(TASKS[task_key], world["evalsets"])
    feats, labels, metas = [], [], []
    for s in wds.WebDataset([str(p) for p in es.shards], shardshuffle=False):
        img = lm.preprocess(Image.open(io.BytesIO(s["png"])))[None]
        with torch.no_grad():
            feats.append(torch.nn.functional.normalize(lm.model.encode_image(img), dim=-1))
        labels.append(int(s["cls"]))
        metas.append(np.load(io.BytesIO(s["npy"])))
    return lm, es, torch.cat(feats), np.array(labels), np.stack(metas)


def test_worst_region_matches_independent_computation(world, tmp_path):
    from benchmark.evaluate import zero_shot_classifier

    s = evaluate(EvalConfig(model=ARCH, pretrained=str(world["ckpt"]), tasks=["fmow"], evalsets=world["evalsets"],
                            out=tmp_path / "r.jsonl", num_workers=0, progress=False))
    m = s["results"]["wilds/fmow"]["metrics"]
    lm, es, feats, labels, metas = _reference_features(world, "wilds/fmow")
    pred = (feats @ zero_shot_classifier(lm, es.classnames, es.templates)).argmax(1).numpy()
    region = metas[:, 0]
    accs = {g: float((pred[region == g] == labels[region == g]).mean()) for g in range(5)}  # 5 = Other: excluded
    assert m["acc_worst_region"] == pytest.approx(min(accs.values()), abs=1e-9)
    assert m["acc1"] == pytest.approx(float((pred == labels).mean()), abs=1e-9)


def test_parity_with_clip_benchmark(world, tmp_path):
    """Same model, same local webdataset: our scores equal clip_benchmark's (DataComp's evaluator)."""
    import torch
    from clip_benchmark.datasets.builder import build_dataset, image_captions_collate_fn
    from clip_benchmark.metrics import zeroshot_classification as zsc
    from clip_benchmark.metrics import zeroshot_retrieval as zsr
    from sklearn.metrics import balanced_accuracy_score

    from curate.clip.models import load_model

    s = evaluate(EvalConfig(model=ARCH, pretrained=str(world["ckpt"]), evalsets=world["evalsets"],
                            tasks=["offline/digits", "offline/emoji_category", "offline/tuxpaint_retrieval"],
                            out=tmp_path / "r.jsonl", batch_size=32, num_workers=0, progress=False))
    lm = load_model(ARCH, str(world["ckpt"]), "cpu")
    for key in ("offline/digits", "offline/emoji_category"):
        root = world["evalsets"] / TASKS[key].folder
        # exactly DataComp's wds_eval path: build_dataset("wds/...") + zero_shot_classifier + run_classification
        ds = build_dataset(f"wds/{key}", root=str(root), transform=lm.preprocess, split="test", download=False)
        loader = torch.utils.data.DataLoader(ds.batched(32), batch_size=None, num_workers=0)
        clf = zsc.zero_shot_classifier(lm.model, lm.tokenizer, ds.classes, ds.templates, "cpu", amp=False)
        logits, target = zsc.run_classification(lm.model, clf, loader, "cpu", amp=False)
        # (clip_benchmark 1.6.2's accuracy() breaks on numpy 2, so acc@k is taken from its logits here)
        ref_acc1 = (logits.argmax(1) == target).float().mean().item()
        ref_acc5 = ((logits.topk(5, 1).indices == target[:, None]).any(1).float().mean().item()
                    if len(ds.classes) >= 5 else None)
        ref_mpcr = balanced_accuracy_score(target.numpy(), logits.argmax(1).numpy())
        ours = s["results"][key]["metrics"]
        assert s["results"][key]["n"] == len(target)
        assert ours["acc1"] == pytest.approx(ref_acc1, abs=1e-3)
        assert ours["acc5"] == (None if ref_acc5 is None else pytest.approx(ref_acc5, abs=1e-3))
        assert ours["mean_per_class_recall"] == pytest.approx(ref_mpcr, abs=1e-3)

    root = world["evalsets"] / TASKS["offline/tuxpaint_retrieval"].folder
    ds = build_dataset("wds/tuxpaint", root=str(root), transform=lm.preprocess, split="test", download=False,
                       task="zeroshot_retrieval")
    loader = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=0, collate_fn=image_captions_collate_fn)
    ref = zsr.evaluate(lm.model, loader, lm.tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    ours = s["results"]["offline/tuxpaint_retrieval"]["metrics"]
    for k in (1, 5, 10):
        for way in ("image", "text"):
            name = f"{way}_retrieval_recall@{k}"
            assert ours[name] == pytest.approx(ref[name], abs=1e-3), name


def test_cli_table_and_user_errors(world, tmp_path):
    from curate.cli import main

    r = CliRunner().invoke(main, ["evaluate", "--model", ARCH, "--pretrained", str(world["ckpt"]),
                                  "--evalsets", str(world["evalsets"]), "--tasks", "mnist,cifar10",
                                  "--out", str(tmp_path / "r.jsonl"), "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert "cifar10" in r.output and "MISSING" in r.output
    assert "over 1 of 38 tasks (PARTIAL: 37 missing" in r.output
    r = CliRunner().invoke(main, ["evaluate", "--run", str(tmp_path)])
    assert r.exit_code == 2 and "info.json not found" in r.output
    r = CliRunner().invoke(main, ["evaluate", "--tasks", "mnist"])
    assert r.exit_code == 2 and "give --run RUN, or --model ARCH" in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": "mnist"}\nnot json\n')
    r = CliRunner().invoke(main, ["evaluate", "--model", ARCH, "--evalsets", str(world["evalsets"]),
                                  "--tasks", "mnist", "--out", str(bad)])
    assert r.exit_code == 2 and "line 2: not a results record" in r.output
    r = CliRunner().invoke(main, ["evaluate", "--model", ARCH, "--tasks", "nonesuch"])
    assert r.exit_code == 2 and "unknown task 'nonesuch'" in r.output


def test_winogavil_layout_scores_like_datacomp(world, tmp_path):
    """WinoGAViL: per instance the top-n candidates for the cue prompt, Jaccard vs the true ones."""
    import torch

    from benchmark.evaluate import encode_texts, winogavil_prompt
    from benchmark.metrics import winogavil_jaccard
    from curate.clip.models import load_model

    colors = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "white": (250, 250, 250),
              "black": (5, 5, 5), "yellow": (230, 230, 20), "cyan": (20, 220, 220), "pink": (250, 150, 200),
              "grey": (128, 128, 128), "orange": (250, 140, 10)}
    names = list(colors)
    instances = [("apple", names[:5], ["red", "green"]), ("ocean", names[:10], ["blue", "cyan", "white"]),
                 ("fire", names[:6], ["red", "orange"])]
    samples = []
    for i, (cue, cands, assoc) in enumerate(instances):
        s = {"__key__": f"{i:04d}", "json": json.dumps({"cue": cue, "candidates": cands, "associations": assoc})}
        for j, c in enumerate(cands):
            s[f"{j}.png"] = _png(colors[c])
        samples.append(s)
    ev = tmp_path / "ev"
    E.write_evalset(ev / "wds_misc-winogavil_test", samples, None, None, dataset_type="winogavil")
    s = evaluate(EvalConfig(model=ARCH, pretrained=str(world["ckpt"]), tasks=["winogavil"], evalsets=ev,
                            out=tmp_path / "r.jsonl", progress=False))
    rec = s["results"]["misc/winogavil"]
    assert rec["n"] == 3 and rec["main_metric"] == "jaccard_score_10-12"

    lm = load_model(ARCH, str(world["ckpt"]), "cpu")
    scores, truths = [], []
    for cue, cands, assoc in instances:
        imgs = torch.stack([lm.preprocess(Image.open(io.BytesIO(_png(colors[c])))) for c in cands])
        with torch.no_grad():
            f = torch.nn.functional.normalize(lm.model.encode_image(imgs), dim=-1)
        scores.append((encode_texts(lm, [winogavil_prompt(cue)]) @ f.T)[0].numpy())
        truths.append(np.isin(cands, assoc))
    ref = winogavil_jaccard(scores, truths)
    for k, v in ref.items():
        assert rec["metrics"][k] == (None if v is None else pytest.approx(v, abs=1e-6)), k
    assert winogavil_prompt("Apple") == "An apple" and winogavil_prompt("fire") == "A fire"
