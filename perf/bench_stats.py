"""Benchmark: item-level intervals for a whole 38-task DataComp result (727,383 items) with 10,000 draws.

The result is synthetic but has DataComp's real shape: every scored task of benchmark/tasks.py with its
real size, class count and main metric type (accuracy, mean per-class recall, worst-group top-1/top-5,
F1-macro, retrieval recall@1 with 5 captions per image, WinoGAViL Jaccard on 10-12 candidates). Accuracies
are drawn per task between 5% and 70%; classification errors go to one of 5 confusable classes (as a
trained CLIP's do), which sets how many distinct (true, predicted) cells F1-macro has to resample.

Timed: per-item columns -> cells (np.unique) -> per-task intervals and the suite average's interval
(`benchmark.stats.intervals`, each task drawn once), i.e. everything `curate compare`/the leaderboard would
pay for one result. The goal is < 5 s on 2 cores.

Usage:
    .venv/bin/python -m perf.bench_stats [--draws 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from benchmark import stats as S
from benchmark.tasks import DATACOMP_SCORED, RETRIEVAL, TASKS, WINOGAVIL


def synthetic_items(rng: np.random.Generator) -> dict[str, tuple]:
    """{task key: (statistic, per-item columns)} for the 38 scored tasks at their real sizes."""
    out = {}
    for key in DATACOMP_SCORED:
        t = TASKS[key]
        n, acc = t.size, rng.uniform(0.05, 0.7)
        if t.type == RETRIEVAL:
            ncap = np.full(n, 5)
            out[key] = (S.RetrievalRecall("mean"), np.c_[ncap, rng.binomial(5, acc, n), rng.random(n) < acc + 0.1])
            continue
        if t.type == WINOGAVIL:
            size = rng.choice([5, 6, 10, 12], n)
            assoc = rng.integers(2, 6, n)
            hits = rng.binomial(assoc, acc)
            out[key] = (S.SubsetMean(), np.c_[size >= 10, hits / (2 * assoc - hits)])
            continue
        c = t.num_classes or 2
        freq = 1 / np.arange(1, c + 1) ** 0.7 if key == "wilds/iwildcam" else np.ones(c)
        target = rng.choice(c, n, p=freq / freq.sum())
        confusable = (target[:, None] + rng.integers(1, c, (1, 5))) % c  # 5 classes each true class is mistaken for
        wrong = confusable[np.arange(n), rng.integers(0, 5, n)]
        right = rng.random(n) < acc
        pred = np.where(right, target, wrong)
        mm = t.main_metric
        if mm == "acc1":
            out[key] = (S.Proportion(), right[:, None])
        elif mm == "mean_per_class_recall":
            out[key] = (S.MeanPerClassRecall(), np.c_[target, right])
        elif mm == "F1-macro_all":
            out[key] = (S.F1Macro(), np.c_[target, pred])
        else:  # worst-group metrics: FMoW (6 regions, "Other" excluded), Dollar Street (4 incomes, top-5), GeoDE
            groups = rng.integers(0, 6 if key != "fairness/dollar_street" else 4, n)
            top5 = right | (rng.random(n) < 0.3)
            out[key] = (S.WorstGroup(tuple(t.exclude_groups)), np.c_[groups, top5 if t.group_topk == 5 else right])
    return out


def run(draws: int) -> tuple[float, float, dict]:
    """(wall s, CPU s of this process, results) of one timed pass."""
    items = synthetic_items(np.random.default_rng(0))
    t0, c0 = time.perf_counter(), time.process_time()
    tasks = {k: S.TaskCells.of(stat, cols) for k, (stat, cols) in items.items()}
    res = S.intervals(tasks, draws=draws, seed=0)
    return time.perf_counter() - t0, time.process_time() - c0, {"res": res, "tasks": tasks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=S.DRAWS)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    times, cpu = [], []
    for _ in range(args.repeat):
        secs, csecs, out = run(args.draws)
        times.append(secs)
        cpu.append(csecs)
    tasks, res = out["tasks"], out["res"]
    n_items = sum(t.n for t in tasks.values())
    print(f"## Item-level intervals, 38-task result ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs)\n")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{len(tasks)} tasks, {n_items:,} items, {args.draws:,} draws: best {min(times):.2f} s wall, "
          f"{min(cpu):.2f} s CPU (runs: {', '.join(f'{t:.2f}' for t in times)} s wall; load average {load:.1f}); "
          f"goal < 5 s on 2 cores\n")
    print("| task | statistic | items | cells | estimate | 95% interval | method |")
    print("|---|---|---:|---:|---:|---|---|")
    for k, iv in res["tasks"].items():
        t = tasks[k]
        print(f"| {k} | {t.stat.name} | {t.n} | {len(t.counts)} | {iv.estimate:.4f} | "
              f"[{iv.low:.4f}, {iv.high:.4f}] | {iv.method} |")
    a = res["average"]
    print(f"| **average** | mean of 38 | {a.n} | | {a.estimate:.4f} | [{a.low:.4f}, {a.high:.4f}] | {a.method} |")


if __name__ == "__main__":
    main()
