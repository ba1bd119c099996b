"""Benchmark: zero-shot evaluation of the offline suite, against the compute ceiling and clip_benchmark.

For each model (random init: only throughput is measured here, not accuracy):
  1. suite wall time: `benchmark.evaluate.evaluate()` on every offline task (fresh results file), and
     images/s over the image-scoring part;
  2. compute ceiling: the same model's `encode_image` on tensors already decoded and preprocessed in
     memory (what the evaluator would reach if decoding, I/O and text encoding were free);
  3. baseline side by side: clip_benchmark's webdataset path (what DataComp's evaluator runs) on the
     same Fashion-MNIST folder and model, same batch size.

Usage:
    .venv/bin/python -m perf.bench_evaluate [--pool-dir POOLBUILD] [--work DIR] [--vit-limit 300]
Prints a markdown section; `--append` adds it to perf/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from benchmark import evalsets as E  # noqa: E402
from benchmark.evaluate import EvalConfig, evaluate  # noqa: E402
from benchmark.tasks import TASKS  # noqa: E402
from curate.clip.models import load_model  # noqa: E402


def ceiling_images_per_s(lm, n: int, batch_size: int) -> float:
    """encode_image throughput on pre-decoded, pre-transformed tensors (best of 2 passes)."""
    from PIL import Image

    x = lm.preprocess(Image.new("RGB", (64, 64), (120, 60, 30)))
    batch = x[None].repeat(batch_size, 1, 1, 1).to(lm.device)
    best = 0.0
    with torch.no_grad():
        lm.model.encode_image(batch[:2])  # warm-up
        for _ in range(2):
            t0 = time.perf_counter()
            done = 0
            while done < n:
                lm.model.encode_image(batch)
                done += batch_size
            best = max(best, done / (time.perf_counter() - t0))
    return best


def _cpu_s() -> float:
    """CPU seconds of this process and its reaped children (DataLoader workers): robust to other load."""
    import resource

    r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def clip_benchmark_run(lm, folder: Path, batch_size: int) -> dict:
    """DataComp's path (clip_benchmark build_dataset + zero_shot_classifier + run_classification): wall, CPU s,
    n and its metrics (top-1 accuracy, mean per-class recall) for the 1e-3 agreement check."""
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification as zsc

    t0, c0 = time.perf_counter(), _cpu_s()
    ds = build_dataset("wds/fashion_mnist", root=str(folder), transform=lm.preprocess, split="test", download=False)
    loader = torch.utils.data.DataLoader(ds.batched(batch_size), batch_size=None, num_workers=1)
    clf = zsc.zero_shot_classifier(lm.model, lm.tokenizer, ds.classes, ds.templates, lm.device, amp=False)
    logits, target = zsc.run_classification(lm.model, clf, loader, lm.device, amp=False)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    pred = logits.argmax(dim=1)
    acc1 = float((pred == target).float().mean())
    recall = [float((pred[target == c] == c).float().mean()) for c in target.unique()]
    return {"wall_s": wall, "cpu_s": cpu, "n": len(target), "acc1": acc1,
            "mean_per_class_recall": sum(recall) / len(recall)}


def clip_benchmark_seconds(lm, folder: Path, batch_size: int) -> tuple[float, int]:
    r = clip_benchmark_run(lm, folder, batch_size)
    return r["wall_s"], r["n"]


def ours_fashion_mnist(arch: str, ckpt: Path, evalsets: Path, work: Path, batch_size: int, cache) -> dict:
    """`evaluate()` on Fashion-MNIST alone: what `curate evaluate --tasks fashion_mnist` costs, model load included
    (`task_s` is the task alone; clip_benchmark's side is handed a loaded model)."""
    out = work / f"fm-{arch}.jsonl"
    out.unlink(missing_ok=True)
    t0, c0 = time.perf_counter(), _cpu_s()
    s = evaluate(EvalConfig(model=arch, pretrained=str(ckpt), tasks=["offline/fashion_mnist"], evalsets=evalsets, out=out,
                            batch_size=batch_size, num_workers=1, progress=False, force=True, decode_cache=cache))
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    r = s["results"]["offline/fashion_mnist"]
    return {"wall_s": wall, "cpu_s": cpu, "task_s": r["seconds"], "n": r["n"], "acc1": r["metrics"]["acc1"],
            "mean_per_class_recall": r["metrics"]["mean_per_class_recall"]}


def run_model(arch: str, evalsets: Path, work: Path, batch_size: int, suite: bool = True) -> dict:
    """Fashion-MNIST side by side (clip_benchmark; ours with no cache; ours filling an empty decode cache; ours
    on a cache hit), each with wall and CPU seconds and load average, then (with `suite`) the offline suite."""
    import shutil

    from curate.clip.models import save_checkpoint

    # random init, saved once, so that both sides score the very same weights (the 1e-3 agreement check)
    ckpt = work / f"{arch}-random.pt"
    save_checkpoint(load_model(arch, None, "auto").model, ckpt)
    lm = load_model(arch, str(ckpt), "auto")
    fm = evalsets / TASKS["offline/fashion_mnist"].folder
    cache = work / f"decode-cache-{arch}"
    shutil.rmtree(cache, ignore_errors=True)
    fmr = {}
    for name, fn in [
        ("clip_benchmark", lambda: clip_benchmark_run(lm, fm, batch_size)),
        ("ours_nocache", lambda: ours_fashion_mnist(arch, ckpt, evalsets, work, batch_size, "off")),
        ("ours_cold", lambda: ours_fashion_mnist(arch, ckpt, evalsets, work, batch_size, cache)),
        ("ours_warm", lambda: ours_fashion_mnist(arch, ckpt, evalsets, work, batch_size, cache)),
    ]:
        la0 = os.getloadavg()[0]
        fmr[name] = {**fn(), "load_start": la0, "load_end": os.getloadavg()[0]}
        print(name, fmr[name], file=sys.stderr)
    cb = fmr["clip_benchmark"]
    for name in ("ours_nocache", "ours_cold", "ours_warm"):
        for m in ("acc1", "mean_per_class_recall"):  # the same model and images must score the same
            if abs(fmr[name][m] - cb[m]) > 1e-3:
                raise SystemExit(f"{name} {m} {fmr[name][m]:.5f} differs from clip_benchmark's {cb[m]:.5f} by > 1e-3")
    out = {"arch": arch, "fm": fmr, "fm_n": cb["n"], "fm_cb_s": cb["wall_s"], "fm_ours_s": fmr["ours_nocache"]["wall_s"]}
    if not suite:
        return out
    res = work / f"results-{arch}.jsonl"
    res.unlink(missing_ok=True)
    t0 = time.perf_counter()
    s = evaluate(EvalConfig(model=arch, pretrained=str(ckpt), tasks=["offline"], evalsets=evalsets, out=res,
                            batch_size=batch_size,
                            num_workers=1, progress=False, force=True, decode_cache="off"))
    wall = time.perf_counter() - t0
    n_images = sum(r["n"] + r["n_failed"] for r in s["results"].values())
    task_seconds = sum(r["seconds"] for r in s["results"].values())
    ceiling = ceiling_images_per_s(lm, n=max(batch_size * 4, 256), batch_size=batch_size)
    return {**out, "wall_s": wall, "n_images": n_images, "task_s": task_seconds,
            "suite_ips": n_images / task_seconds, "ceiling_ips": ceiling,
            "per_task": {k: (r["n"], r["seconds"]) for k, r in s["results"].items()},
            "missing": sorted(s["missing"])}


def phase_profile(arch: str, evalsets: Path, threads: int = 1) -> list[tuple[str, float, int]]:
    """CPU seconds of each phase of zero-shot Fashion-MNIST, each timed alone (time.process_time, `threads` torch
    threads so that spinning OpenMP threads do not count): (phase, CPU s, images)."""

    from benchmark import decode_cache as D
    from benchmark.evaluate import zero_shot_classifier
    from curate.clip import models
    from curate.core.images import decode_image
    from curate.core.tar_reader import iter_members

    torch.set_num_threads(threads)
    lm = load_model(arch, None, "cpu")
    es = E.open_evalset(TASKS["offline/fashion_mnist"], evalsets)
    pt, out = time.process_time, []
    t, raw = pt(), []
    for s in es.shards:  # the project's one tar reader (what the evaluator's loader reads shards with)
        raw.extend(m.data for m in iter_members(s, read={"png"}) if m.ext == "png" and m.data is not None)
    out.append(("tar read (curate.core.tar_reader)", pt() - t))
    t = pt()
    imgs = [decode_image(b) for b in raw]
    out.append(("PNG decode (decode_image)", pt() - t))
    t = pt()
    [lm.preprocess(i) for i in imgs]
    out.append(("full transform per image (clip_benchmark's)", pt() - t))
    split = D.split_preprocess(lm.preprocess)
    t = pt()
    u8 = [split.to_uint8(i) for i in imgs]
    out.append(("resize + crop to uint8 per image (ours)", pt() - t))
    t = pt()
    xs = [split.normalise(torch.stack(u8[i:i + 64])) for i in range(0, len(u8), 64)]
    out.append(("normalise per batch (ours)", pt() - t))
    t = pt()
    [models.encode_images(lm.model, x) for x in xs]
    out.append(("forward (encode_images)", pt() - t))
    t = pt()
    zero_shot_classifier(lm, es.classnames, es.templates)
    out.append(("text classifier", pt() - t))
    return [(k, v, len(raw)) for k, v in out]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool-dir", type=Path, default=None, help="offline pool build (for its held-out splits)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--models", default="curate-tiny,ViT-B-32")
    ap.add_argument("--tiny-limit", type=int, default=None, help="samples per task for curate-tiny (default: all)")
    ap.add_argument("--vit-limit", type=int, default=300,
                    help="samples per task for ViT-B-32 (about 11 img/s on 2 CPU cores: the full suite takes ~20 min)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--append", action="store_true", help="append the section to perf/RESULTS.md")
    ap.add_argument("--quick", action="store_true", help="perf.run_all's size: curate-tiny, 100 samples per task")
    ap.add_argument("--json", help="write the result (perf/result.py's shape) to this file")
    ap.add_argument("--fm-only", action="store_true",
                    help="only the Fashion-MNIST comparison (clip_benchmark, ours without / filling / hitting the "
                         "decode cache), not the offline suite")
    ap.add_argument("--phases", type=Path, default=None, metavar="EVALSETS",
                    help="only print the per-phase CPU profile (one torch thread) of Fashion-MNIST in EVALSETS")
    a = ap.parse_args(argv)
    if a.phases:
        print("| phase | CPU s | images | ms / image |\n|---|---|---|---|")
        for k, v, n in phase_profile(a.models.split(",")[0], a.phases):
            print(f"| {k} | {v:.2f} | {n} | {1e3 * v / n:.3f} |")
        return 0
    if a.quick:
        a.models, a.tiny_limit = "curate-tiny", 100
    work = a.work or Path(tempfile.mkdtemp(prefix="bench_evaluate-"))
    rows = []
    for arch in a.models.split(","):
        limit = a.vit_limit if arch.startswith("ViT") else a.tiny_limit
        ev = work / f"evalsets-limit{limit or 'all'}"
        t0 = time.perf_counter()
        E.build_offline(E.BuildOfflineConfig(out=ev, pool_dir=a.pool_dir, limit=limit))
        build_s = time.perf_counter() - t0
        r = run_model(arch, ev, work, a.batch_size, suite=not a.fm_only)
        r["limit"], r["build_s"] = limit, build_s
        rows.append(r)
        print(r, file=sys.stderr)

    cmd = "NO_ALBUMENTATIONS_UPDATE=1 nice .venv/bin/python -m perf.bench_evaluate " + " ".join(argv or sys.argv[1:])
    machine = (f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {platform.machine()}, "
               f"device {'cuda' if torch.cuda.is_available() else 'cpu'}; models are random init (throughput only); "
               f"batch {a.batch_size}, 1 loader worker.")
    lines = ["", "## Zero-shot evaluation: Fashion-MNIST vs clip_benchmark, cold and with the decode cache", "",
             f"Command: `{cmd}`  ", machine, "",
             "| model | images | side | wall (s) | CPU (s) | load start/end | top-1 | CPU ratio vs clip_benchmark "
             "| wall ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cb = r["fm"]["clip_benchmark"]
        for name, x in r["fm"].items():
            lines.append(f"| {r['arch']} | {x['n']} | {name} | {x['wall_s']:.1f} | {x['cpu_s']:.1f} | "
                         f"{x['load_start']:.1f}/{x['load_end']:.1f} | {x['acc1']:.4f} | "
                         f"{cb['cpu_s'] / x['cpu_s']:.2f}x | {cb['wall_s'] / x['wall_s']:.2f}x |")
    lines += ["", "*ours_nocache*: `--decode-cache off`; *ours_cold*: an empty decode cache, filled on the way; "
              "*ours_warm*: the second evaluation, a cache hit (no decode). Ours includes model load and the "
              "results/items files; clip_benchmark's side is handed a loaded model. Top-1 agrees within 1e-3 "
              "(checked; the bench stops otherwise)."]
    if not a.fm_only:
        lines += [
            "", "### The offline suite, no decode cache", "",
            "| model | samples/task | images | suite wall (s) | scoring img/s | ceiling img/s | % of ceiling |",
            "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['arch']} | {r['limit'] or 'all'} | {r['n_images']} | {r['wall_s']:.1f} | "
                         f"{r['suite_ips']:.1f} | {r['ceiling_ips']:.1f} | "
                         f"{100 * r['suite_ips'] / r['ceiling_ips']:.0f}% |")
        for r in rows:
            per = ", ".join(f"{k.split('/')[1]} {n} in {s:.1f}s" for k, (n, s) in r["per_task"].items())
            lines.append(f"\n{r['arch']}: {per}; build-offline {r['build_s']:.1f}s"
                         + (f"; missing: {', '.join(r['missing'])}" if r["missing"] else ""))
        lines += ["", "Meaning: *suite wall* is what `curate evaluate --tasks offline` costs end to end (model load, "
                  "text classifiers, decoding, scoring). *Scoring img/s* counts every image over the per-task time; "
                  "the *ceiling* is encode_image alone on tensors already in memory, so the gap is decoding, PNG/tar "
                  "I/O, preprocessing and text encoding."]
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if a.append:
        with open(Path(__file__).parent / "RESULTS.md", "a", encoding="utf-8") as fh:
            fh.write(text)
    from perf.result import bench_result, write

    r0 = rows[0]
    if r0["fm_ours_s"]:  # Fashion-MNIST CPU seconds, ours (no cache) vs clip_benchmark's loop, same folder and model
        fm = r0["fm"]
        write(a.json, bench_result("evaluate", fm["ours_nocache"]["cpu_s"], fm["clip_benchmark"]["cpu_s"],
                                   "CPU s (Fashion-MNIST, no decode cache)",
                                   higher_is_better=False, baseline_name="clip_benchmark zero-shot loop",
                                   goal=2.0 if r0["arch"] == "curate-tiny" else 1.2, details={"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
