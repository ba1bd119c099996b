"""Training throughput: `curate train` versus `open_clip_train.main` (the trainer in open_clip's wheel).

Same model config (curate-tiny, registered into open_clip for both), same global batch, same
shards (resampled), same precision (fp32 on CPU, the only one that runs here), same optimizer
settings, same number of data workers. Each trainer runs as its own process, one after the other,
alternating over repeats; we compare steady-state samples/s from their per-step logs (median over
steps after the first `--skip` warm-up steps; each log measures the time between consecutive step
ends, data wait included) and the end-to-end wall time of the process.

    nice .venv/bin/python -m perf.bench_train [--steps 30 --batch 256 --workers 2 --repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_OPENCLIP_WRAPPER = (
    "import sys; from curate.clip.models import register_configs; register_configs(); "
    "from open_clip_train.main import main; main(sys.argv[1:])"
)


def run_ours(data: Path, out: Path, steps: int, batch: int, workers: int) -> tuple[list[float], float]:
    cmd = [sys.executable, "-m", "curate.cli", "train", "--data", str(data), "--scale", "tiny", "--out", str(out),
           "--workers", str(workers), "--device", "cpu", "--no-progress", "--unofficial",
           "--set", f"samples_seen={steps * batch}", "--set", f"batch_size={batch}", "--set", "num_checkpoints=1"]
    t = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    wall = time.perf_counter() - t
    rates = [json.loads(x)["samples_per_s"] for x in (out / "log.jsonl").read_text().splitlines()]
    return rates, wall


def run_openclip(data: Path, out: Path, steps: int, batch: int, workers: int) -> tuple[list[float], float]:
    from benchmark.scales import get_scale

    sc = get_scale("tiny")
    tars = sorted(p.name for p in (data / "shards").glob("*.tar"))
    first, last = tars[0].split(".")[0], tars[-1].split(".")[0]
    cmd = [sys.executable, "-c", _OPENCLIP_WRAPPER,
           "--train-data", str(data / "shards" / f"{{{first}..{last}}}.tar"), "--dataset-type", "webdataset",
           "--dataset-resampled", "--train-num-samples", str(steps * batch), "--epochs", "1",
           "--batch-size", str(batch), "--model", "curate-tiny", "--precision", "fp32", "--workers", str(workers),
           "--lr", str(sc.lr), "--warmup", str(sc.warmup), "--wd", str(sc.weight_decay), "--beta1", str(sc.beta1),
           "--beta2", str(sc.beta2), "--eps", str(sc.eps), "--logs", str(out), "--name", "bench",
           "--log-every-n-steps", "1", "--save-frequency", "0", "--report-to", "", "--seed", "0"]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"open_clip_train.main failed:\n{r.stderr[-3000:]}")
    text = (out / "bench" / "out.log").read_text()
    rates = [float(x) for x in re.findall(r"([\d.]+)/s/gpu", text)]
    return rates, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the median")
    ap.add_argument("--concurrent", action="store_true", help="run both trainers at the same time (loaded machine)")
    ap.add_argument("--quick", action="store_true", help="perf.run_all's size: 12 steps of 128, 1 repeat")
    ap.add_argument("--json", help="write the result (perf/result.py's shape) to this file")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.batch, args.repeats, args.skip = 12, 128, 1, 3

    from curate.core import uids as uidlib
    from curate.reshard.stage import ReshardConfig, reshard
    from tests.pool_factory import make_pool

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    root = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        fp = make_pool(root / "pool", n_shards=4, per_shard=500, corrupt=0, failed=0, image_size=96)
        uidlib.save(root / "subset" / "uids.npy", fp.success_uids())
        reshard(ReshardConfig(subset=root / "subset", pool=fp.pool, shard_size=500, workers=1, progress=False))
        ours, theirs = [], []
        if args.concurrent:  # both at once: on a shared, loaded machine each sees the same contention
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(2) as ex:
                fo = ex.submit(run_ours, root / "subset", root / "c_ours", args.steps, args.batch, args.workers)
                ft = ex.submit(run_openclip, root / "subset", root / "c_oc", args.steps, args.batch, args.workers)
                (ro, wo), (rt, wt) = fo.result(), ft.result()
            mo, mt = statistics.median(ro[args.skip:]), statistics.median(rt[args.skip:])
            print(f"RESULT concurrent: curate {mo:.1f} samples/s (wall {wo:.1f}s) vs open_clip_train {mt:.1f} "
                  f"samples/s (wall {wt:.1f}s): {mo / mt:.2f}x")
            return
        for r in range(args.repeats):
            for name, fn, acc in (("curate", run_ours, ours), ("open_clip_train", run_openclip, theirs)):
                out = root / f"{name}{r}"
                rates, wall = fn(root / "subset", out, args.steps, args.batch, args.workers)
                med = statistics.median(rates[args.skip:])
                acc.append((med, wall))
                print(f"repeat {r} {name}: {len(rates)} steps, median {med:.1f} samples/s, wall {wall:.1f}s",
                      flush=True)
                shutil.rmtree(out, ignore_errors=True)
        o = statistics.median(m for m, _ in ours)
        t = statistics.median(m for m, _ in theirs)
        ow = statistics.median(w for _, w in ours)
        tw = statistics.median(w for _, w in theirs)
        print(f"RESULT curate {o:.1f} samples/s vs open_clip_train {t:.1f} samples/s: {o / t:.2f}x; "
              f"wall {ow:.1f}s vs {tw:.1f}s ({tw / ow:.2f}x)")
        from perf.result import bench_result, write

        write(args.json, bench_result("train", o, t, "samples/s", baseline_name="open_clip_train.main", goal=1.0,
                                      details={"wall_s": ow, "baseline_wall_s": tw, "steps": args.steps,
                                               "batch": args.batch, "repeats": args.repeats}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
