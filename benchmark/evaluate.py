"""Zero-shot evaluation stage: RUN (or ARCH + checkpoint) -> RUN/eval_results.jsonl.

Scores a CLIP model on DataComp's tasks and the offline suite the way DataComp does: a zero-shot
classifier from class names x prompt templates (each class = mean of its L2-normalised template
text embeddings, renormalised), image-text retrieval recall@k both ways, WinoGAViL Jaccard, WILDS
and fairness worst-group metrics (benchmark/metrics.py).

Reliability: results are written atomically after each task, one JSON line per task
(docs/FORMATS.md, "Evaluation results", with `model_id` so a changed checkpoint is never mixed with old scores), and a
task already scored for the same model is not recomputed. A task whose data is absent is reported
*missing* - never scored 0 - and each average says how many tasks it covers.

Per-item results: beside the results file, `<results stem>.items/<task>.parquet` records what each item
scored (classification: true class, predicted class, rank of the true class, group; retrieval: per image
the best rank of any of its captions and the rank of the image for each of its captions; WinoGAViL: per
instance the candidates, associations and hits), with the model id, task and eval-set fingerprint in the
file's metadata. They are what `benchmark.stats` resamples for intervals and paired comparisons, and
`metrics_from_items` recomputes every reported metric from them exactly. Each is written before its
results line, so a results line written by this version always has its item file.

Integrity: before anything is scored, each task's items (webdataset samples in its shards) are counted and
checked against the size it must have - the build manifest's `n` (`build.json`, written with every set curate
builds or converts) or else the task registry's `size` (a DataComp set as downloaded) - because a missing shard
or deleted items would otherwise score as a full, smaller set (clip_benchmark once scored one shard of many
without a word). A partial set is refused with a CurateError naming the task, the counts and how to rebuild
it; with `--allow-partial` it is scored and its line says `"partial": true` with `n_expected`, and every
reader of results (benchmark.results.main_value: averages, the leaderboard, bundles, `curate compare`)
treats it as not scored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from benchmark import metrics as M
from benchmark.decode_cache import DecodeCache, entry_key_parts, split_preprocess
from benchmark.evalsets import (
    EvalSet, MissingEvalSet, decode_image, default_evalsets_dir, iter_batches, iter_winogavil, open_evalset,
    transform_output_size,
)
from benchmark.tasks import (
    CLASSIFICATION, DATACOMP_SCORED, FAIRNESS, OFFLINE_KEYS, RETRIEVAL, TASKS, WILDS, WINOGAVIL, Task,
    resolve_tasks,
)
from curate.clip import models
from curate.core.atomic import cleanup_temp_siblings, write_json, write_parquet, write_text
from curate.core.errors import CurateError

log = logging.getLogger(__name__)

RESULTS_FILE = "eval_results.jsonl"
SUMMARY_FILE = "eval_summary.json"
MAX_FAILED_KEYS = 20  # failed sample keys kept per task in the results line (the count is exact)
ITEMS_FORMAT = 1  # version of the per-item parquet layout (docstring of `write_items`)
ITEMS_META_KEY = b"curate.items"


@dataclass
class EvalConfig:
    """What to evaluate. Either `run` (a training RUN folder) or `model` (+ `pretrained`)."""

    run: Path | None = None  # RUN/info.json ("model"/"arch", "final_checkpoint") + RUN/final.pt
    model: str | None = None
    pretrained: str | None = None
    tasks: list[str] | None = None  # keys, "datacomp", "offline" or "all" (default)
    evalsets: Path | None = None  # default: $CURATE_EVALSETS or <repo>/work/evalsets
    out: Path | None = None  # default: RUN/eval_results.jsonl, or ./eval_results.jsonl with --model
    batch_size: int = 64
    device: str = "auto"
    num_workers: int = 1
    force: bool = False  # recompute tasks already in the results file
    progress: bool | None = None  # tqdm bars; None = only on a terminal
    allow_partial: bool = False  # score a set with fewer (or more) items than expected, marked "partial"
    # decoded-pixel cache (benchmark/decode_cache.py): a folder or "off"; None = $CURATE_EVAL_CACHE or the user
    # cache dir. Its byte budget: None = $CURATE_EVAL_CACHE_BYTES or 2 GiB; 0 disables.
    decode_cache: Path | str | None = None
    decode_cache_bytes: int | None = None


def resolve_model(cfg: EvalConfig) -> tuple[str, str | None, Path]:
    """(arch, checkpoint path, results file) from a RUN folder or --model/--pretrained."""
    if cfg.run is not None:
        run = Path(cfg.run)
        info_p = run / "info.json"
        if not info_p.is_file():
            raise CurateError(f"--run {run}: {info_p} not found (is this a training run folder?)")
        try:
            info = json.loads(info_p.read_text())
        except ValueError as e:
            raise CurateError(f"{info_p}: not valid JSON ({e})") from None
        arch = cfg.model or info.get("arch") or info.get("model")
        if not arch:
            raise CurateError(f"{info_p}: no 'arch' field naming the model architecture")
        ckpt = cfg.pretrained
        if ckpt is None:
            # benchmark/train.py names the final weights in info.json ("final_checkpoint", relative
            # to RUN); older layouts used RUN/checkpoints/final.pt
            names = [info.get("final_checkpoint") or "final.pt", "final.pt", "checkpoints/final.pt"]
            for name in names:
                p = (run / str(name)).resolve()
                if p.is_relative_to(run.resolve()) and p.is_file():
                    ckpt = str(p)
                    break
            else:
                raise CurateError(f"--run {run}: no final checkpoint ({', '.join(dict.fromkeys(map(str, names)))}); "
                                  f"has training finished? (info.json status: {info.get('status', '?')})")
        elif not os.path.isfile(ckpt):
            raise CurateError(f"--pretrained {ckpt}: checkpoint file not found")
        return arch, ckpt, Path(cfg.out) if cfg.out else run / RESULTS_FILE
    if not cfg.model:
        raise CurateError("give --run RUN, or --model ARCH with --pretrained CHECKPOINT")
    return cfg.model, cfg.pretrained, Path(cfg.out) if cfg.out else Path.cwd() / RESULTS_FILE


# --------------------------------------------------------------------------------------------
# Model-side helpers
# --------------------------------------------------------------------------------------------


def encode_texts(lm, texts: list[str], batch_size: int = 256):
    """L2-normalised text embeddings (float32, on CPU) for a list of strings.

    Through the project's one encode path (curate.clip.models.encode_texts: trimmed to each batch's longest
    caption, autocast on CUDA), the same as `curate embed`'s captions."""
    import torch

    out = []
    for i in range(0, len(texts), batch_size):
        tok = lm.tokenizer(texts[i:i + batch_size]).to(lm.device)
        out.append(models.encode_texts(lm.model, tok).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def zero_shot_classifier(lm, classnames: list[str], templates: list[str]):
    """(dim, n_classes) weights: per class the renormalised mean of its normalised template embeddings."""
    import torch.nn.functional as F
    import torch

    texts = [t.replace("{c}", c) for c in classnames for t in templates]
    emb = encode_texts(lm, texts).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1).T.contiguous().to(torch.float32)


def encode_images(lm, evalset: EvalSet, batch_size: int, num_workers: int, progress: bool,
                  cache: DecodeCache | None = None) -> dict:
    """Run every sample of `evalset` through the image tower.

    Returns features of the decodable images plus their labels/captions/metadata, and the keys and
    reasons of samples whose image failed (they are reported, not scored).

    When the model's preprocessing splits at the uint8 pixels (benchmark.decode_cache.split_preprocess:
    open_clip's Resize/CenterCrop/ToTensor/Normalize), samples are decoded to uint8 (a quarter of the bytes
    through the loader's queue) and normalised per batch here, bit for bit what the whole transform computes.
    With a `cache`, a set seen before with the same preprocessing is read from its memory-mapped pixels (no tar,
    no decode, no DataLoader); a set not seen yet is written to the cache while it is scored.
    """
    import torch
    from tqdm import tqdm

    split = split_preprocess(lm.preprocess)
    writer = entry = None
    if split is None:
        batches = iter_batches(evalset, lm.preprocess, batch_size, num_workers)
    else:
        parts = None
        if cache is not None:
            parts = entry_key_parts(evalset.task.key, evalset.root, evalset.shards, split.spec)
            entry = cache.get(parts)
        if entry is not None:
            batches = cached_batches(entry, batch_size)
        else:
            if cache is not None:
                writer = cache.writer(parts, count_items(evalset), transform_output_size(split.to_uint8))
            batches = iter_batches(evalset, split.to_uint8, batch_size, num_workers)

    feats, labels, captions, metas, keys, failed = [], [], [], [], [], []
    total = 0
    bar = tqdm(desc=evalset.task.key, unit="img", disable=not progress, leave=False)
    try:
        for batch in batches:
            ok = batch["ok"]
            total += len(ok)
            images = batch["images"]
            if split is not None and images.dtype != torch.uint8:
                images = images.to(torch.uint8)  # a failed sample's float placeholder promoted the batch
            if writer is not None:
                writer.add(images, batch["keys"], batch["labels"], ok.tolist(), batch["errors"], batch["captions"],
                           batch["meta"])
            if not ok.all():
                failed.extend({"key": k, "error": e} for k, e, good in
                              zip(batch["keys"], batch["errors"], ok.tolist()) if not good)
            if ok.any():
                imgs = images if ok.all() else images[ok]
                if split is not None:
                    imgs = split.normalise(imgs)
                feats.append(models.encode_images(lm.model, imgs.to(lm.device)).cpu())
                if ok.all():
                    labels.append(batch["labels"])
                    captions.extend(batch["captions"])
                    metas.extend(batch["meta"])
                    keys.extend(batch["keys"])
                else:
                    idx = ok.nonzero().flatten().tolist()
                    labels.append(batch["labels"][ok])
                    captions.extend(batch["captions"][i] for i in idx)
                    metas.extend(batch["meta"][i] for i in idx)
                    keys.extend(batch["keys"][i] for i in idx)
            bar.update(len(ok))
        if writer is not None:
            writer.commit()
    finally:
        if writer is not None:
            writer.abort()  # no-op after a commit
        bar.close()
    return {
        "features": torch.cat(feats) if feats else torch.zeros(0, 0),
        "labels": torch.cat(labels).numpy() if labels else np.zeros(0, dtype=np.int64),
        "captions": captions, "meta": metas, "keys": keys, "failed": failed, "total": total,
    }


def cached_batches(entry, batch_size: int):
    """Batches (iter_batches' dicts) from a decode-cache entry: slices of its memory-mapped uint8 pixels."""
    import torch

    n = entry.pixels.shape[0]
    for i in range(0, n, batch_size):
        j = min(i + batch_size, n)
        yield {"images": torch.from_numpy(np.array(entry.pixels[i:j])), "ok": torch.from_numpy(entry.ok[i:j].copy()),
               "keys": entry.keys[i:j], "labels": torch.from_numpy(entry.labels[i:j].copy()),
               "captions": entry.captions[i:j], "meta": entry.meta[i:j], "errors": entry.errors[i:j]}


# --------------------------------------------------------------------------------------------
# Per task type
# --------------------------------------------------------------------------------------------


def _groups(metas: list, task: Task) -> np.ndarray:
    return np.asarray([np.asarray(m).reshape(-1)[task.group_field] for m in metas]).astype(np.int64)


def evalset_fingerprint(task: Task, prompts: dict, columns: list) -> str:
    """Content hash of what a task was scored on: its key, prompts/class names and, per scored item,
    its key and label (or captions, or WinoGAViL instance). Two results with the same fingerprint were
    scored on the same items with the same labels, whatever folder or machine they came from, so a
    paired comparison may align them item by item."""
    h = hashlib.sha256(json.dumps({"task": task.key, **prompts}, sort_keys=True, default=str).encode())
    for col in columns:
        h.update(json.dumps(col, default=str).encode())
    return h.hexdigest()[:16]


def _group_metrics(task: Task, logits: np.ndarray, labels: np.ndarray, metas: list) -> dict:
    if task.group_field is None:
        return {}
    if any(m is None for m in metas):
        raise CurateError(f"{task.key}: worst-group metric needs a .npy metadata row in every sample")
    groups = _groups(metas, task)
    correct = (M.topk_predictions(logits, task.group_topk) == labels[:, None]).any(axis=1)
    per_group = M.group_accuracies(correct, groups, exclude=task.exclude_groups)
    out = {f"acc_group_{g}": acc for g, (acc, _) in sorted(per_group.items())}
    out[task.group_metric] = M.worst_group_accuracy(logits, labels, groups, task.group_topk, task.exclude_groups)
    if task.group_topk != 1:
        out[f"acc_top{task.group_topk}_avg"] = float(correct.mean())
    return out


def decode_cache_for(cfg: EvalConfig) -> DecodeCache | None:
    """The decode cache `cfg` names (its fields, else the environment); None when it is off."""
    return DecodeCache.from_settings(cfg.decode_cache, cfg.decode_cache_bytes)


def eval_classification(lm, task: Task, es: EvalSet, cfg: EvalConfig, progress: bool) -> dict:
    enc = encode_images(lm, es, cfg.batch_size, cfg.num_workers, progress, decode_cache_for(cfg))
    n = len(enc["labels"])
    if n == 0:
        raise CurateError(f"{task.key}: no decodable image in {es.root} ({len(enc['failed'])} failed)")
    bad = enc["labels"][(enc["labels"] < 0) | (enc["labels"] >= len(es.classnames))]
    if len(bad):
        raise CurateError(f"{task.key}: label {int(bad[0])} outside 0..{len(es.classnames) - 1} "
                          f"({len(es.classnames)} lines in {es.root / 'classnames.txt'})")
    W = zero_shot_classifier(lm, es.classnames, es.templates)
    logits = (100.0 * enc["features"] @ W).numpy()
    metrics = M.classification_metrics(logits, enc["labels"])
    if task.type == WILDS and task.main_metric == "F1-macro_all":
        pred = M.topk_predictions(logits, 1)[:, 0]
        metrics["F1-macro_all"] = M.f1_macro(enc["labels"], pred)
    metrics.update(_group_metrics(task, logits, enc["labels"], enc["meta"]))
    items = {"key": enc["keys"], "target": enc["labels"], "pred": np.argmax(logits, axis=1),
             "rank": M.true_class_rank(logits, enc["labels"])}
    metrics["mrr"] = M.mean_reciprocal_rank(items["rank"])
    if task.group_field is not None:
        items["group"] = _groups(enc["meta"], task)
    fp = evalset_fingerprint(task, {"classnames": es.classnames, "templates": es.templates},
                             [enc["keys"], enc["labels"].tolist()])
    return {"metrics": metrics, "n": n, "failed": enc["failed"], "total": enc["total"],
            "items": items, "items_meta": {"n_classes": len(es.classnames)}, "fingerprint": fp}


def eval_retrieval(lm, task: Task, es: EvalSet, cfg: EvalConfig, progress: bool) -> dict:
    enc = encode_images(lm, es, cfg.batch_size, cfg.num_workers, progress, decode_cache_for(cfg))
    texts, t2i = [], []
    for i, caps in enumerate(enc["captions"]):
        texts.extend(caps)
        t2i.extend([i] * len(caps))
    if not texts:
        raise CurateError(f"{task.key}: no captions (.txt) in {es.root}")
    T = encode_texts(lm, texts, cfg.batch_size)
    sim = (T @ enc["features"].T).numpy()
    metrics = M.retrieval_recall(sim, np.asarray(t2i), ks=(1, 5, 10))
    ranks = M.retrieval_ranks(sim, np.asarray(t2i))
    metrics.update(M.retrieval_mrr_from_ranks(ranks["caption_image_rank"], ranks["image_caption_rank"]))
    n_caps = np.asarray([len(c) for c in enc["captions"]], dtype=np.int64)
    items = {"key": enc["keys"], "n_captions": n_caps, "text_rank": ranks["image_caption_rank"],
             "caption_ranks": (ranks["caption_image_rank"], n_caps)}
    fp = evalset_fingerprint(task, {}, [enc["keys"], enc["captions"]])
    return {"metrics": metrics, "n": len(enc["keys"]), "n_texts": len(texts),
            "failed": enc["failed"], "total": enc["total"], "items": items, "items_meta": {}, "fingerprint": fp}


def winogavil_prompt(cue: str) -> str:
    """DataComp's WinoGAViL text prompt: "A <cue>" / "An <cue>" (lower-cased)."""
    cue = cue.lower()
    return f"An {cue}" if cue[:1] in "aeiou" else f"A {cue}"


def eval_winogavil(lm, task: Task, es: EvalSet, cfg: EvalConfig, progress: bool) -> dict:
    import torch
    from tqdm import tqdm

    scores, truths, failed, total, keys, defs = [], [], [], 0, [], []
    with torch.no_grad():
        for inst in tqdm(iter_winogavil(es), desc=task.key, disable=not progress, leave=False):
            total += 1
            try:
                if any(b is None for b in inst["images"]):
                    raise ValueError("a candidate image is missing from the sample")
                imgs = torch.stack([lm.preprocess(decode_image(b)) for b in inst["images"]])
            except ValueError as e:
                failed.append({"key": inst["key"], "error": str(e)})
                continue
            img = models.encode_images(lm.model, imgs.to(lm.device))
            txt = encode_texts(lm, [winogavil_prompt(inst["cue"])]).to(lm.device)
            scores.append((txt @ img.T).squeeze(0).cpu().numpy())
            truths.append(np.isin(inst["candidates"], inst["associations"]))
            keys.append(inst["key"])
            defs.append([inst["cue"], list(inst["candidates"]), list(inst["associations"])])
    if not scores:
        raise CurateError(f"{task.key}: no usable instance in {es.root}")
    items = {"key": keys, **M.winogavil_instances(scores, truths)}
    return {"metrics": M.winogavil_jaccard(scores, truths), "n": len(scores), "failed": failed, "total": total,
            "items": items, "items_meta": {}, "fingerprint": evalset_fingerprint(task, {}, [keys, defs])}


_RUNNERS = {CLASSIFICATION: eval_classification, WILDS: eval_classification, FAIRNESS: eval_classification,
            RETRIEVAL: eval_retrieval, WINOGAVIL: eval_winogavil}


# --------------------------------------------------------------------------------------------
# Integrity: is the eval set complete?
# --------------------------------------------------------------------------------------------


def count_items(es: EvalSet) -> int:
    """Samples in the set's shards, counted from the tar headers alone (nothing is decoded).

    A sample is a run of consecutive members with the same key (the name up to the first dot of its base
    name), which is how webdataset groups them when the set is scored."""
    import tarfile

    n = 0
    for shard in es.shards:
        last = None
        try:
            with tarfile.open(shard, "r:*") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    d, _, base = m.name.rpartition("/")
                    key = (d, base.split(".", 1)[0])
                    if key != last:
                        n, last = n + 1, key
        except (tarfile.TarError, OSError) as e:
            raise CurateError(f"{es.task.key}: shard {shard} is unreadable ({e}); {rebuild_hint(es.task)}") from None
    return n


def expected_items(task: Task, folder: Path) -> tuple[int | None, str]:
    """(items the set must have, where that number comes from): the build manifest's `n` (folder/build.json,
    written by `curate evalsets build-offline` and for every set curate converts), else the registry's
    `size` for a DataComp task; (None, why) when neither exists."""
    manifest = folder / "build.json"
    if manifest.is_file():
        try:
            n = json.loads(manifest.read_text(encoding="utf-8")).get("n")
        except (ValueError, AttributeError):
            n = None
        if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
            return n, f"its build manifest {manifest}"
        raise CurateError(f"{task.key}: {manifest} has no item count 'n'; {rebuild_hint(task)}")
    if task.size > 0:
        return task.size, "the task registry (benchmark/tasks.py)"
    return None, f"no build manifest ({manifest} not found) and no size in the task registry"


def rebuild_hint(task: Task) -> str:
    if task.download:
        return f"download it again with `curate evalsets download --tasks {task.key}`"
    return "rebuild it with `curate evalsets build-offline` (with the same --pool-dir as before)"


def check_complete(task: Task, es: EvalSet) -> dict | None:
    """None when the set has exactly the expected items; else {"n_expected", "n_found", "message"}.
    The caller refuses it, or with --allow-partial scores it marked partial."""
    expected, source = expected_items(task, es.root)
    found = count_items(es)
    listed = es.root / "test" / "nshards.txt"
    n_listed = int(listed.read_text().strip()) if listed.is_file() else len(es.shards)  # open_evalset checked it
    absent = [f"{i}.tar" for i in range(n_listed) if not (es.root / "test" / f"{i}.tar").is_file()] \
        if listed.is_file() else []
    if expected is not None and found == expected and not absent:
        return None
    lost = f"; {listed} lists {n_listed} shards, {', '.join(absent[:5])} missing" if absent else ""
    if expected is None:
        msg = f"{task.key}: cannot check that {es.root} is complete ({source}{lost}); {rebuild_hint(task)}"
    else:
        msg = (f"{task.key}: the eval set in {es.root} has {found} items in {len(es.shards)} shard(s), but "
               f"{expected} are expected ({source}{lost}): it is partial (a shard or items are missing); "
               f"{rebuild_hint(task)}")
    return {"n_expected": expected, "n_found": found, "message": msg}


# --------------------------------------------------------------------------------------------
# Per-item results
# --------------------------------------------------------------------------------------------


def items_dir(results_file: Path) -> Path:
    """Folder of a results file's per-item files: `RUN/eval_results.items/` beside `RUN/eval_results.jsonl`."""
    results_file = Path(results_file)
    return results_file.with_name(results_file.stem + ".items")


def items_path(results_file: Path, key: str) -> Path:
    return items_dir(results_file) / (key.replace("/", "--") + ".parquet")


def write_items(path: Path, items: dict, meta: dict) -> None:
    """One task's per-item results as zstd parquet (int32 columns; `key` = the sample key).

    classification/WILDS/fairness: key, target, pred, rank (0 = the true class scored highest)[, group];
    retrieval (one row per image, the resampling unit): key, n_captions, text_rank (best rank of any of
    the image's captions when the image is the query; -1 = no caption), caption_ranks (list: the image's
    rank for each of its captions as query); WinoGAViL: key, n_candidates, n_associations, hits, jaccard.
    `meta` (model_id, task, main_metric, kind, evalset_fingerprint, n, n_classes, ...) is stored as JSON
    under the schema metadata key `curate.items`.
    """
    import pyarrow as pa

    cols = {}
    for name, v in items.items():
        if name == "key":
            cols[name] = pa.array([str(k) for k in v], pa.string())
        elif name == "caption_ranks":
            flat, counts = v
            offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
            cols[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.asarray(flat, dtype=np.int32)))
        elif name == "jaccard":
            cols[name] = pa.array(np.asarray(v, dtype=np.float64))
        else:
            cols[name] = pa.array(np.asarray(v).astype(np.int32))
    table = pa.table(cols)
    table = table.replace_schema_metadata({ITEMS_META_KEY: json.dumps({"format": ITEMS_FORMAT, **meta},
                                                                      sort_keys=True)})
    write_parquet(path, table, compression="zstd")


def items_meta(path: Path) -> dict | None:
    """The metadata of a per-item file, or None when there is none (cheap: reads only the footer)."""
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        return None
    try:
        md = pq.read_schema(path).metadata or {}
        return json.loads(md[ITEMS_META_KEY])
    except (OSError, KeyError, ValueError) as e:
        raise CurateError(f"{path}: not a per-item results file ({e}); re-run `curate evaluate --force`") from None


def _has_items(results_file: Path, key: str, model_id: str) -> bool:
    try:
        return (items_meta(items_path(results_file, key)) or {}).get("model_id") == model_id
    except CurateError:  # unreadable: as good as absent; the hint rewrites it
        return False


def reevaluate_hint(results_file: Path, keys: list[str]) -> str:
    """The command that (re)writes the per-item files of `keys` for a results file."""
    results_file = Path(results_file)
    where = (f"--run {results_file.parent}" if results_file.name == RESULTS_FILE and (results_file.parent / "info.json").is_file()
             else f"--model ARCH --pretrained CHECKPOINT --out {results_file}")
    return f"curate evaluate {where} --tasks {','.join(keys)} --force"


def read_items(results_file: Path, key: str, model_id: str | None = None) -> tuple[dict, dict]:
    """(columns as numpy arrays, metadata) of one task's per-item file next to `results_file`.

    Raises CurateError with the re-evaluation command when the file is absent (results written before
    per-item files existed) or belongs to another model than the results line (`model_id`).
    `caption_ranks` comes back flattened in caption order, with `n_captions` giving each image's share.
    """
    import pyarrow.parquet as pq

    path = items_path(results_file, key)
    meta = items_meta(path)
    if meta is None:
        raise CurateError(f"{results_file}: task {key} has no per-item results ({path} not found; it was scored "
                          f"before curate recorded them); write them with `{reevaluate_hint(results_file, [key])}`")
    if model_id is not None and meta.get("model_id") != model_id:
        raise CurateError(f"{path}: per-item results of model {meta.get('model_id')}, but {results_file} scored "
                          f"{model_id}; re-run `{reevaluate_hint(results_file, [key])}`")
    table = pq.read_table(path)
    cols = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if name == "key":
            cols[name] = np.asarray(col.to_pylist(), dtype=object)
        elif name == "caption_ranks":
            cols[name] = col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        else:
            cols[name] = col.to_numpy(zero_copy_only=False).astype(np.float64 if name == "jaccard" else np.int64)
    return cols, meta


def task_as_scored(task: Task, line: dict) -> Task:
    """`task` with the main metric its result line was scored by: a line written before the task's main metric
    changed (suite v2: MRR since 2026-12-02) keeps its own, so item-level intervals and paired tests resample the
    metric its value is, never the registry's newer one."""
    import dataclasses

    mm = line.get("main_metric")
    return dataclasses.replace(task, main_metric=mm) if isinstance(mm, str) and mm != task.main_metric else task


def main_metric_cells(task: Task, items: dict):
    """(benchmark.stats statistic, per-item columns) of `task`'s main metric from its per-item results:
    what `benchmark.stats` resamples for intervals and paired comparisons. Columns are in item order."""
    from benchmark import stats as S

    mm = task.main_metric
    if task.type == RETRIEVAL:
        if mm not in ("mean_recall@1", "mean_mrr"):
            raise CurateError(f"{task.key}: no item statistic for main metric {mm!r}")
        cr, tr = items["caption_ranks"], items["text_rank"]
        if mm == "mean_recall@1":
            per_caption, per_image = (cr < 1).astype(np.int64), (tr >= 0) & (tr < 1)
        else:  # reciprocal ranks: the same image-unit statistic over 1/(rank+1) instead of 0/1 hits
            per_caption, per_image = M.reciprocal_ranks(cr), M.reciprocal_ranks(tr)
        bounds = np.concatenate([[0], np.cumsum(items["n_captions"])])
        hits = np.add.reduceat(per_caption, bounds[:-1]) \
            if len(cr) else np.zeros(len(bounds) - 1, dtype=np.int64)
        hits = np.where(items["n_captions"] > 0, hits, 0)  # reduceat repeats a value at an empty segment
        return S.RetrievalRecall("mean"), np.c_[items["n_captions"], hits, per_image]
    if task.type == WINOGAVIL:
        if mm != "jaccard_score_10-12":
            raise CurateError(f"{task.key}: no item statistic for main metric {mm!r}")
        return S.SubsetMean(), np.c_[items["n_candidates"] >= 10, items["jaccard"]]
    if mm == "acc1":
        return S.Proportion(), (items["rank"] < 1)[:, None]
    if mm == "mrr":
        return S.Mean(), M.reciprocal_ranks(items["rank"])[:, None]
    if mm == "mean_per_class_recall":
        return S.MeanPerClassRecall(), np.c_[items["target"], items["rank"] < 1]
    if mm == "F1-macro_all":
        return S.F1Macro(), np.c_[items["target"], items["pred"]]
    if task.group_field is not None and mm == task.group_metric:
        return S.WorstGroup(tuple(task.exclude_groups)), np.c_[items["group"], items["rank"] < task.group_topk]
    raise CurateError(f"{task.key}: no item statistic for main metric {mm!r}")


def metrics_from_items(task: Task, items: dict, meta: dict) -> dict:
    """Every metric `curate evaluate` reports for `task`, recomputed from its per-item results alone.

    The values equal the reported ones exactly (same booleans and labels into the same functions), which
    is what lets a verifier or a bootstrap trust the item files.
    """
    if task.type == RETRIEVAL:
        return {**M.retrieval_recall_from_ranks(items["caption_ranks"], items["text_rank"], ks=(1, 5, 10)),
                **M.retrieval_mrr_from_ranks(items["caption_ranks"], items["text_rank"])}
    if task.type == WINOGAVIL:
        return M.winogavil_summary(items["jaccard"], items["n_candidates"])
    target, pred, rank = items["target"], items["pred"], items["rank"]
    out = {"acc1": float((rank < 1).mean()),
           "acc5": float((rank < 5).mean()) if meta.get("n_classes", 0) >= 5 else None,
           "mean_per_class_recall": M.mean_per_class_recall(target, pred), "mrr": M.mean_reciprocal_rank(rank)}
    if task.type == WILDS and task.main_metric == "F1-macro_all":
        out["F1-macro_all"] = M.f1_macro(target, pred)
    if task.group_field is not None:
        correct = rank < task.group_topk
        per_group = M.group_accuracies(correct, items["group"], exclude=task.exclude_groups)
        out.update({f"acc_group_{g}": acc for g, (acc, _) in sorted(per_group.items())})
        if not per_group:
            raise CurateError(f"{task.key}: no group has samples in the per-item results")
        out[task.group_metric] = min(acc for acc, _ in per_group.values())
        if task.group_topk != 1:
            out[f"acc_top{task.group_topk}_avg"] = float(correct.mean())
    return out


# --------------------------------------------------------------------------------------------
# Results file
# --------------------------------------------------------------------------------------------


def read_results(path: Path) -> dict[str, dict]:
    """Existing results by task key (a line that does not parse is an error naming the line)."""
    out: dict[str, dict] = {}
    if not path.is_file():
        return out
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out[rec["key"]] = rec
        except (ValueError, KeyError, TypeError):
            raise CurateError(f"{path} line {i}: not a results record; delete the file or pass --force") from None
    return out


def write_results(path: Path, results: dict[str, dict]) -> None:
    order = {k: i for i, k in enumerate(TASKS)}
    recs = sorted(results.values(), key=lambda r: (order.get(r["key"], len(order)), r["key"]))
    write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in recs))


def aggregates(results: dict[str, dict]) -> dict:
    """DataComp's average over its 38 scored tasks and, separately, the offline suite's average and suite v2's
    headline (benchmark.tasks.SUITE_V2_HEADLINE: in-domain + style-shift tasks; out-of-domain ones are not in it)."""
    from benchmark.tasks import suite_v2_average

    offline_scored = [k for k in OFFLINE_KEYS if TASKS[k].scored]
    full = {k: r for k, r in results.items() if not r.get("partial")}  # a partial set counts as missing
    return {"datacomp": M.datacomp_average(full, DATACOMP_SCORED),
            "offline": M.datacomp_average(full, offline_scored),
            "offline_v2": suite_v2_average(full)["headline"]}


# --------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------


def evaluate(cfg: EvalConfig) -> dict:
    """Evaluate one model on the selected tasks; returns the summary that is also written to disk.

    Summary: {"results": {key: record}, "missing": {key: reason}, "skipped": {key: reason},
    "computed": [keys], "reused": [keys], "aggregates": {...}, "results_file": path}.
    """
    from curate.clip.models import load_model, model_id as make_model_id
    from curate.core.stage import StageSummary

    t_start = time.perf_counter()
    arch, ckpt, out = resolve_model(cfg)
    root = Path(cfg.evalsets) if cfg.evalsets else default_evalsets_dir()
    tasks = resolve_tasks(cfg.tasks)
    progress = cfg.progress if cfg.progress is not None else os.isatty(2)
    mid = make_model_id(arch, ckpt)

    for f in (out, out.with_name(SUMMARY_FILE)):
        cleanup_temp_siblings(f)  # what a killed run was writing; its finished tasks are in `out`
    try:
        existing = read_results(out)
    except CurateError:
        if not cfg.force:
            raise
        existing = {}  # --force: an unreadable results file is replaced
    # scores of another model (e.g. a re-trained checkpoint) are dropped, never mixed; --force
    # recomputes the selected tasks and keeps this model's other results
    selected = {t.key for t in tasks}
    # a partial score is reused only while --allow-partial is given: without it the set is checked again
    results = {k: r for k, r in existing.items() if r.get("model_id") == mid and not (cfg.force and k in selected)
               and not (r.get("partial") and k in selected and not cfg.allow_partial)}
    stale = sorted(k for k, r in existing.items() if r.get("model_id") != mid)
    if stale:
        log.warning("dropping %d results of another model from %s", len(stale), out)

    missing, skipped, todo = {}, {}, []
    for task in tasks:
        if task.key in results:
            continue
        if not task.scored:
            skipped[task.key] = "unscored bias task (FairFace/UTKFace): not evaluated by curate"
            continue
        try:
            es = open_evalset(task, root, allow_missing_shards=True)  # check_complete counts what is there
        except MissingEvalSet as e:
            missing[task.key] = str(e)
            continue
        todo.append((task, es, check_complete(task, es)))
    partial = [(t, p) for t, _, p in todo if p is not None]
    if partial and not cfg.allow_partial:
        raise CurateError("refusing to score partial evaluation sets (a missing shard must never pass as a full "
                          "score):\n  " + "\n  ".join(p["message"] for _, p in partial)
                          + "\nor pass --allow-partial to score them marked partial (kept out of averages, the "
                          "leaderboard and compare)")
    for t, p in partial:
        log.warning("%s (scored anyway: --allow-partial; marked partial)", p["message"])
    reused = [t.key for t in tasks if t.key in results]

    computed = []
    if todo:
        lm = load_model(arch, ckpt, cfg.device)
        for task, es, incomplete in todo:
            t0 = time.perf_counter()
            res = _RUNNERS[task.type](lm, task, es, cfg, progress)
            failed = res.pop("failed")
            items, extra_meta, fp = res.pop("items"), res.pop("items_meta"), res.pop("fingerprint")
            write_items(items_path(out, task.key), items,
                        {"model_id": mid, "task": task.key, "main_metric": task.main_metric, "kind": task.type,
                         "evalset_fingerprint": fp, "n": res["n"], **extra_meta})
            rec = {
                "key": task.key, "dataset": task.name, "main_metric": task.main_metric,
                "metrics": res.pop("metrics"), "n": res.pop("n"), "n_failed": len(failed),
                "failed": failed[:MAX_FAILED_KEYS], "model_id": mid, "suite": task.suite,
                "seconds": round(time.perf_counter() - t0, 3), "evalset_fingerprint": fp, **res,
            }
            if rec["n"] + rec["n_failed"] != rec.pop("total"):
                raise AssertionError(f"{task.key}: samples not accounted for")  # a bug, not a user error
            if incomplete is not None:  # only with --allow-partial: never read as a full score
                rec.update(partial=True, n_expected=incomplete["n_expected"])
            results[task.key] = rec
            write_results(out, results)  # after every task: a killed run resumes from here
            computed.append(task.key)
    elif not out.exists() or set(results) != set(existing):  # dropped stale / --force results
        write_results(out, results)

    # results reused from an older evaluation may lack their per-item file: say so, and how to write it
    no_items = [k for k in reused if not _has_items(out, k, mid)]
    summary = {
        "model": arch, "pretrained": ckpt, "model_id": mid, "evalsets": str(root), "results_file": str(out),
        "results": results, "missing": missing, "skipped": skipped, "computed": computed, "reused": reused,
        "no_items": no_items, "aggregates": aggregates(results), "trained_with": _trained_with(cfg.run),
    }
    write_json(out.with_name(SUMMARY_FILE), {k: v for k, v in summary.items() if k != "results"})
    # the stage contract (curate.core.stage): up to date when no task had to be computed
    return StageSummary("evaluate", not computed, time.perf_counter() - t_start, fields=summary).as_dict()


def _trained_with(run: Path | None) -> dict | None:
    """The training run's seed and reproducibility record (benchmark/train.py), shown with its scores:
    the same seed and data give other weights under another torch, thread count, device or CPU."""
    if run is None:
        return None
    try:
        info = json.loads((Path(run) / "info.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or "reproducibility" not in info:
        return None
    return {"seed": info.get("seed"), **info["reproducibility"]}


def _fmt(v) -> str:
    return "-" if v is None else f"{100 * v:6.2f}"


def format_table(summary: dict) -> str:
    rows = [f"{'task':52s} {'metric':22s} {'score':>6s} {'n':>7s}"]
    for key, rec in summary["results"].items():
        v = rec["metrics"].get(rec["main_metric"])
        rows.append(f"{key:52s} {rec['main_metric']:22s} {_fmt(v)} {rec['n']:7d}"
                    + (f"  ({rec['n_failed']} unreadable)" if rec.get("n_failed") else "")
                    + (f"  PARTIAL: {rec['n'] + rec.get('n_failed', 0)} of {rec.get('n_expected')} items, not a "
                       "full score (not in averages)" if rec.get("partial") else ""))
    for key, reason in summary["missing"].items():
        rows.append(f"{key:52s} {'MISSING':22s} {'':>6s} {'':>7s}  {reason}")
    for name, agg in summary["aggregates"].items():
        label = {"datacomp": "DataComp average (38 tasks)", "offline": "Offline suite average (separate)",
                 "offline_v2": "Offline suite v2 headline (in-domain + style shift)"}.get(name, name)
        if name == "offline_v2" and agg["n_tasks"] == 0:
            continue  # suite v2 is opt-in (`--tasks offline_v2`): no line when it was not asked for
        if agg["n_tasks"] == 0:
            rows.append(f"{label}: no task scored")
        else:
            note = "complete" if agg["complete"] else f"PARTIAL: {agg['n_total'] - agg['n_tasks']} missing, not comparable"
            rows.append(f"{label}: {_fmt(agg['average']).strip()} over {agg['n_tasks']} of {agg['n_total']} tasks ({note})")
    tw = summary.get("trained_with")
    if tw:
        rows.append(f"trained with: seed {tw.get('seed')}, torch {tw.get('torch')}, {tw.get('torch_threads')} intra-op "
                    f"thread(s), device {tw.get('device')}, CPU {tw.get('cpu')}"
                    + (f", GPU {tw['gpu']}" if tw.get("gpu") else ""))
    return "\n".join(rows)


@click.command("evaluate")
@click.option("--run", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Training run folder (RUN/info.json names the architecture and the final checkpoint, RUN/final.pt).")
@click.option("--model", default=None, help="open_clip architecture (e.g. curate-tiny, ViT-B-32) instead of --run.")
@click.option("--pretrained", default=None, help="Local checkpoint file for --model (omit for random init).")
@click.option("--tasks", multiple=True,
              help="Task keys or suffixes (cifar100, fashion_mnist), or 'datacomp', 'offline', 'all' (default). "
                   "Repeatable or comma-separated.")
@click.option("--evalsets", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Evaluation sets folder (default: $CURATE_EVALSETS or <repo>/work/evalsets).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Results file (default: RUN/eval_results.jsonl, or ./eval_results.jsonl with --model).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
@click.option("--workers", "num_workers", type=click.IntRange(min=0), default=1, show_default=True,
              help="Data loader processes decoding images while the model runs.")
@click.option("--force", is_flag=True, help="Recompute tasks that already have results.")
@click.option("--allow-partial", is_flag=True,
              help="Score eval sets whose item count differs from the expected size (a missing shard, deleted "
                   "items) instead of refusing them; their lines say \"partial\": true and they count as not "
                   "scored in averages, the leaderboard and compare.")
@click.option("--decode-cache", default=None, metavar="DIR|off",
              help="Folder of decoded eval-set pixels reused by later evaluations (default: $CURATE_EVAL_CACHE, "
                   "else $XDG_CACHE_HOME/curate/eval or ~/.cache/curate/eval); 'off' disables it.")
@click.option("--decode-cache-bytes", type=click.IntRange(min=0), default=None,
              help="Byte budget of the decode cache, least recently used entries evicted (default: "
                   "$CURATE_EVAL_CACHE_BYTES or 2 GiB; 0 disables).")
@click.option("--list-tasks", is_flag=True, help="List the task registry and exit.")
def evaluate_cmd(run, model, pretrained, tasks, evalsets, out, batch_size, device, num_workers, force, allow_partial,
                 decode_cache, decode_cache_bytes, list_tasks):
    """Zero-shot evaluation on DataComp's 38 tasks and the offline suite.

    Writes one JSON line per task to eval_results.jsonl and prints a table. Tasks whose data is not
    under --evalsets are reported MISSING (never scored 0); the DataComp average says how many of
    its 38 tasks it covers, and the offline suite has its own, separate average. Tasks already scored
    for the same weights are not recomputed. Get the DataComp sets with `curate evalsets download`,
    build the offline ones with `curate evalsets build-offline`.
    """
    if list_tasks:
        for t in TASKS.values():
            click.echo(f"{t.key:52s} {t.suite:8s} {t.type:14s} {t.main_metric or 'unscored':22s} {t.name}")
        return
    summary = evaluate(EvalConfig(run=run, model=model, pretrained=pretrained, tasks=list(tasks) or None,
                                  evalsets=evalsets, out=out, batch_size=batch_size, device=device,
                                  num_workers=num_workers, force=force, allow_partial=allow_partial,
                                  decode_cache=decode_cache, decode_cache_bytes=decode_cache_bytes))
    click.echo(format_table(summary))
    if summary["reused"] and not summary["computed"]:
        click.echo(f"already up to date: {len(summary['reused'])} task(s) reused from {summary['results_file']}")
    if summary["no_items"]:
        click.echo(f"note: {len(summary['no_items'])} reused task(s) have no per-item results (scored before curate "
                   f"recorded them; intervals and `curate compare` need them): "
                   f"{reevaluate_hint(Path(summary['results_file']), summary['no_items'])}")
    click.echo(f"wrote {summary['results_file']}")
