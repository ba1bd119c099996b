"""Benchmark: `dedup` on 1,000,000 x 512 embeddings with 10,000 planted near-duplicate pairs.

    .venv/bin/python -m perf.bench_dedup                      # full size (~10 min on 2 busy cores)
    .venv/bin/python -m perf.bench_dedup --n 100000 --pairs 1000 --sample 20000   # quick look

What is measured, each side in its own child process (so peak RSS is that side's alone):
* ours: the real `filters.dedup.DedupFilter.apply` (``index: auto`` -> IVF at this size) on the
  full set: wall time, peak RSS, recall of the planted pairs (both ends in one group), and how many
  rows were dropped beyond the planted ones (false duplicates).
* baseline: exact search (faiss IndexFlatIP self-kNN, the same `near_pairs` code with
  ``index: flat``) on a uniform random sample of ``--sample`` rows. Exact self-search costs
  O(n^2 d), so its time at full size is extrapolated as t_sample x (n / sample)^2. Running it on 1M
  directly would take hours on this machine, which is the point of the comparison.

Data: unit vectors drawn around 2,000 random cluster centres (within-cluster cosine ~0.5, like
CLIP embeddings, not uniform noise), then for each planted pair the second row is replaced by a
copy of the first perturbed to cosine U(0.955, 0.995) (all above the 0.95 threshold), so the
ground truth is known. Everything is seeded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_data(n: int, d: int, pairs: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2000, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, d), dtype=np.float32)
    step = 100_000
    for s in range(0, n, step):
        e = min(n, s + step)
        x[s:e] = rng.standard_normal((e - s, d), dtype=np.float32) / np.sqrt(d)
        x[s:e] += centres[rng.integers(0, len(centres), e - s)]
        x[s:e] /= np.linalg.norm(x[s:e], axis=1, keepdims=True)
    ends = rng.choice(n, 2 * pairs, replace=False)
    src, dst = ends[:pairs], ends[pairs:]
    v = x[src]
    g = rng.standard_normal((pairs, d), dtype=np.float32)
    g -= (g * v).sum(1, keepdims=True) * v
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    cos = rng.uniform(0.955, 0.995, (pairs, 1)).astype(np.float32)
    x[dst] = cos * v + np.sqrt(1 - cos**2) * g
    x[dst] /= np.linalg.norm(x[dst], axis=1, keepdims=True)
    return x, src, dst


def child_ours(args) -> dict:
    import pyarrow as pa

    from filters.base import Batch
    from filters.dedup import DedupFilter

    x, src, dst = make_data(args.n, args.d, args.pairs)
    n = len(x)
    uids = [f"{i:032x}" for i in range(n)]
    table = pa.table({"uid": uids, "sha256": [f"{i:064x}" for i in range(n)], "text": [""] * n,
                      "shard": np.zeros(n, np.int64), "key": [f"{i:09d}" for i in range(n)]})
    f = DedupFilter(DedupFilter.Params(on="image", threshold=0.95, index=args.index))
    f.setup({"seed": 0})
    t0 = time.perf_counter()
    res = f.apply(Batch(table, image_emb=x))
    wall = time.perf_counter() - t0
    keeper = np.arange(n)
    dropped = np.flatnonzero(~res.keep)
    for r in dropped:
        keeper[r] = int(res.reason[r][len("duplicate of "):][:32], 16)
    recall = float(np.mean(keeper[src] == keeper[dst]))
    planted_dst = np.zeros(n, bool)
    planted_dst[src] = planted_dst[dst] = True
    return {"wall_s": wall, "recall": recall, "dropped": int(len(dropped)),
            "dropped_outside_planted": int((~res.keep & ~planted_dst).sum()),
            "index": f.last_index.describe()}


def child_exact(args) -> dict:
    from curate import faiss_index

    x, src, dst = make_data(args.n, args.d, args.pairs)
    rng = np.random.default_rng(1)
    idx = np.sort(rng.choice(len(x), args.sample, replace=False))
    xs = np.ascontiguousarray(x[idx])
    del x
    t0 = time.perf_counter()
    i, j, _, choice = faiss_index.near_pairs(xs, 0.95, index="flat")
    wall = time.perf_counter() - t0
    pos = {int(v): k for k, v in enumerate(idx)}
    both = [(pos[a], pos[b]) for a, b in zip(src.tolist(), dst.tolist()) if a in pos and b in pos]
    found = set(zip(i.tolist(), j.tolist()))
    rec = float(np.mean([(min(a, b), max(a, b)) in found for a, b in both])) if both else float("nan")
    return {"wall_s": wall, "pairs_in_sample": len(both), "recall_in_sample": rec, "index": choice.describe()}


def run_child(side: str, args) -> dict:
    cmd = [sys.executable, "-m", "perf.bench_dedup", "--child", side, "--n", str(args.n), "--d", str(args.d),
           "--pairs", str(args.pairs), "--sample", str(args.sample), "--index", args.index]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"{side} child failed")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_s"] = time.perf_counter() - t0
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=10_000)
    ap.add_argument("--sample", type=int, default=100_000)
    ap.add_argument("--index", default="auto")
    ap.add_argument("--child", choices=["ours", "exact"])
    args = ap.parse_args(argv)
    if args.child:
        res = child_ours(args) if args.child == "ours" else child_exact(args)
        res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return
    ours = run_child("ours", args)
    exact = run_child("exact", args)
    scale = (args.n / args.sample) ** 2
    exact_full = exact["wall_s"] * scale
    data_mib = args.n * args.d * 4 / 2**20
    print(f"# bench_dedup: n={args.n:,} d={args.d} planted pairs={args.pairs:,} threads={os.cpu_count()} "
          f"({platform.processor() or platform.machine()}), load avg at end {os.getloadavg()[0]:.1f}")
    print(f"ours ({ours['index']}): dedup wall {ours['wall_s']:.1f} s, peak RSS {ours['peak_rss_mib']:.0f} MiB "
          f"(the float32 embeddings alone are {data_mib:.0f} MiB), recall of planted pairs {ours['recall']:.4f}, "
          f"rows dropped {ours['dropped']:,} (outside planted pairs: {ours['dropped_outside_planted']:,})")
    print(f"exact ({exact['index']}) on a {args.sample:,} sample: {exact['wall_s']:.1f} s, peak RSS "
          f"{exact['peak_rss_mib']:.0f} MiB, recall on the {exact['pairs_in_sample']} planted pairs inside "
          f"the sample {exact['recall_in_sample']:.4f}")
    print(f"exact extrapolated to n={args.n:,}: {exact['wall_s']:.1f} s x ({args.n:,}/{args.sample:,})^2 = "
          f"{exact_full:,.0f} s ({exact_full / 3600:.1f} h)")
    print(f"speed-up vs exact: {exact_full / ours['wall_s']:.1f}x")


if __name__ == "__main__":
    main()
