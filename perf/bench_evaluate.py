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


def clip_benchmark_seconds(lm, folder: Path, batch_size: int) -> tuple[float, int]:
    """DataComp's path (clip_benchmark build_dataset + zero_shot_classifier + run_classification)."""
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification as zsc

    t0 = time.perf_counter()
    ds = build_dataset("wds/fashion_mnist", root=str(folder), transform=lm.preprocess, split="test", download=False)
    loader = torch.utils.data.DataLoader(ds.batched(batch_size), batch_size=None, num_workers=1)
    clf = zsc.zero_shot_classifier(lm.model, lm.tokenizer, ds.classes, ds.templates, lm.device, amp=False)
    logits, target = zsc.run_classification(lm.model, clf, loader, lm.device, amp=False)
    return time.perf_counter() - t0, len(target)


def run_model(arch: str, evalsets: Path, work: Path, batch_size: int) -> dict:
    lm = load_model(arch, None, "auto")
    out = work / f"results-{arch}.jsonl"
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    s = evaluate(EvalConfig(model=arch, tasks=["offline"], evalsets=evalsets, out=out, batch_size=batch_size,
                            num_workers=1, progress=False, force=True))
    wall = time.perf_counter() - t0
    n_images = sum(r["n"] + r["n_failed"] for r in s["results"].values())
    task_seconds = sum(r["seconds"] for r in s["results"].values())
    ceiling = ceiling_images_per_s(lm, n=max(batch_size * 4, 256), batch_size=batch_size)
    fm = evalsets / TASKS["offline/fashion_mnist"].folder
    fm_ours = s["results"].get("offline/fashion_mnist")
    cb_s, cb_n = clip_benchmark_seconds(lm, fm, batch_size)
    return {
        "arch": arch, "wall_s": wall, "n_images": n_images, "task_s": task_seconds,
        "suite_ips": n_images / task_seconds, "ceiling_ips": ceiling,
        "per_task": {k: (r["n"], r["seconds"]) for k, r in s["results"].items()},
        "missing": sorted(s["missing"]),
        "fm_ours_s": fm_ours["seconds"] if fm_ours else None, "fm_n": cb_n, "fm_cb_s": cb_s,
    }


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
    a = ap.parse_args(argv)
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
        r = run_model(arch, ev, work, a.batch_size)
        r["limit"], r["build_s"] = limit, build_s
        rows.append(r)
        print(r, file=sys.stderr)

    cmd = "NO_ALBUMENTATIONS_UPDATE=1 nice .venv/bin/python -m perf.bench_evaluate " + " ".join(argv or sys.argv[1:])
    lines = [
        "", "## Zero-shot evaluation: offline suite wall time, images/s vs compute ceiling, vs clip_benchmark",
        "", f"Command: `{cmd}`  ",
        f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {platform.machine()}, "
        f"device {'cuda' if torch.cuda.is_available() else 'cpu'}; models are random init (throughput only); "
        f"batch {a.batch_size}, 1 loader worker; other jobs were running on the machine (numbers are noisy).", "",
        "| model | samples/task | images | suite wall (s) | scoring img/s | ceiling img/s | % of ceiling "
        "| FMNIST ours (s) | FMNIST clip_benchmark (s) | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spd = f"{r['fm_cb_s'] / r['fm_ours_s']:.2f}x" if r["fm_ours_s"] else "-"
        lines.append(
            f"| {r['arch']} | {r['limit'] or 'all'} | {r['n_images']} | {r['wall_s']:.1f} | {r['suite_ips']:.1f} "
            f"| {r['ceiling_ips']:.1f} | {100 * r['suite_ips'] / r['ceiling_ips']:.0f}% | "
            f"{r['fm_ours_s'] or 0:.1f} | {r['fm_cb_s']:.1f} | {spd} |")
    for r in rows:
        per = ", ".join(f"{k.split('/')[1]} {n} in {s:.1f}s" for k, (n, s) in r["per_task"].items())
        lines.append(f"\n{r['arch']}: {per}; build-offline {r['build_s']:.1f}s"
                     + (f"; missing: {', '.join(r['missing'])}" if r["missing"] else ""))
    lines += ["", "Meaning: *suite wall* is what `curate evaluate --tasks offline` costs end to end (model load, "
              "text classifiers, decoding, scoring). *Scoring img/s* counts every image over the per-task time; the "
              "*ceiling* is encode_image alone on tensors already in memory, so the gap is decoding, PNG/tar I/O, "
              "preprocessing and text encoding. *Speedup* is clip_benchmark's time over ours on the same "
              "Fashion-MNIST folder and model (DataComp's evaluation path; >1 means we are faster).", ""]
    text = "\n".join(lines)
    print(text)
    if a.append:
        with open(Path(__file__).parent / "RESULTS.md", "a", encoding="utf-8") as fh:
            fh.write(text)
    from perf.result import bench_result, write

    r0 = rows[0]
    if r0["fm_ours_s"]:  # Fashion-MNIST seconds, ours vs clip_benchmark's loop on the same folder and model
        write(a.json, bench_result("evaluate", r0["fm_ours_s"], r0["fm_cb_s"], "s (Fashion-MNIST)",
                                   higher_is_better=False, baseline_name="clip_benchmark zero-shot loop",
                                   details={"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
