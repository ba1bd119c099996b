"""Benchmark: `dedup` on 1,000,000 x 512 embeddings with 10,000 planted near-duplicate pairs.

    .venv/bin/python -m perf.bench_dedup                      # full size (~10 min on 2 busy cores)
    .venv/bin/python -m perf.bench_dedup --n 100000 --pairs 1000 --sample 20000   # quick look
    .venv/bin/python -m perf.bench_dedup --concurrent   # both sides at once: compare CPU seconds
    .venv/bin/python -m perf.bench_dedup --quality POOL --truth BUILD/truth.parquet  # offline pool quality

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
    t0, c0 = time.perf_counter(), time.process_time()
    res = f.apply(Batch(table, image_emb=x))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    keeper = np.arange(n)
    dropped = np.flatnonzero(~res.keep)
    for r in dropped:
        keeper[r] = int(res.reason[r][len("duplicate of "):][:32], 16)
    recall = float(np.mean(keeper[src] == keeper[dst]))
    planted_dst = np.zeros(n, bool)
    planted_dst[src] = planted_dst[dst] = True
    return {"wall_s": wall, "cpu_s": cpu, "recall": recall, "dropped": int(len(dropped)),
            "dropped_outside_planted": int((~res.keep & ~planted_dst).sum()),
            "index": f.last_index.describe()}


def child_exact(args) -> dict:
    from curate.lib import faiss_index

    x, src, dst = make_data(args.n, args.d, args.pairs)
    rng = np.random.default_rng(1)
    idx = np.sort(rng.choice(len(x), args.sample, replace=False))
    xs = np.ascontiguousarray(x[idx])
    del x
    t0, c0 = time.perf_counter(), time.process_time()
    i, j, _, choice = faiss_index.near_pairs(xs, 0.95, index="flat")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    pos = {int(v): k for k, v in enumerate(idx)}
    both = [(pos[a], pos[b]) for a, b in zip(src.tolist(), dst.tolist()) if a in pos and b in pos]
    found = set(zip(i.tolist(), j.tolist()))
    rec = float(np.mean([(min(a, b), max(a, b)) in found for a, b in both])) if both else float("nan")
    return {"wall_s": wall, "cpu_s": cpu, "pairs_in_sample": len(both), "recall_in_sample": rec, "index": choice.describe()}


def truth_root(truth) -> dict[str, str]:
    """uid -> the uid of the original it (transitively) duplicates, itself if none."""
    parent = dict(zip(truth["uid"], truth["duplicate_of"]))
    root = {}
    for u in parent:
        r, hops = u, 0
        while parent.get(r) and hops < 100:
            r, hops = parent[r], hops + 1
        root[u] = r
    return root


def thumbnails(pool: Path, uids: list[str]) -> np.ndarray:
    """16x16 RGB thumbnails of the pool's shard images, centred and L2-normalised, aligned with uids."""
    import io
    import tarfile

    from PIL import Image

    feats: dict[str, np.ndarray] = {}
    for tar in sorted((pool / "shards").glob("*.tar")):
        with tarfile.open(tar) as tf:
            members = {m.name: m for m in tf.getmembers() if m.isfile()}
            for name, m in members.items():
                if not name.endswith(".json"):
                    continue
                uid = json.loads(tf.extractfile(m).read())["uid"]
                jpg = members.get(name[:-5] + ".jpg")
                if jpg is None:
                    continue
                try:
                    with Image.open(io.BytesIO(tf.extractfile(jpg).read())) as im:
                        a = np.asarray(im.convert("RGB").resize((16, 16), Image.BILINEAR), np.float32).ravel()
                except OSError:
                    continue
                a -= a.mean()
                feats[uid] = a / max(np.linalg.norm(a), 1e-6)
    nan = np.full(16 * 16 * 3, np.nan, np.float32)
    return np.stack([feats.get(u, nan) for u in uids])


def quality(args) -> None:
    """Recall / precision of `dedup` against the offline pool builder's injected duplicates."""
    import duckdb
    import pyarrow.parquet as pq

    from filters.base import Batch
    from filters.dedup import DedupFilter

    pool = Path(args.quality)
    models = sorted(p.name for p in (pool / "embeddings").iterdir() if p.is_dir())
    mid = args.model_id or models[0]
    con = duckdb.connect()
    t = con.sql(f"""SELECT m.uid, m.sha256, m.text, m.shard, m.key, e.clip_score, e.image_emb, e.text_emb
                    FROM read_parquet('{pool}/metadata/*.parquet') m
                    JOIN read_parquet('{pool}/embeddings/{mid}/*.parquet') e USING (uid)
                    WHERE m.status = 'success' ORDER BY m.uid""").to_arrow_table()
    def vec(col):
        return np.array([np.nan * np.ones(t[col].type.list_size) if v is None else v
                         for v in t[col].to_pylist()], dtype=np.float32)
    img, txt = vec("image_emb"), vec("text_emb")
    if args.embed == "thumbnails":
        img = thumbnails(pool, t["uid"].to_pylist())
        mid = "thumbnails (16x16 RGB, centred; a stand-in for a trained image tower)"
    table = t.drop_columns(["image_emb", "text_emb"])
    truth = pq.read_table(args.truth).to_pydict()
    root = truth_root(truth)
    noise = dict(zip(truth["uid"], truth["noise"]))
    uids = table["uid"].to_pylist()
    present = set(uids)
    # Injected duplicates whose original also made it into the pool (both downloaded).
    dups = [u for u in uids if root.get(u, u) != u and root[u] in present]
    print(f"# dedup quality on {pool} ({len(uids)} downloaded rows, embeddings {mid}); "
          f"{len(dups)} injected duplicates with their original downloaded")
    print("| threshold | on | dropped | recall (exact / near) | precision |")
    print("|---|---|---|---|---|")
    for on in ("image",):
        for thr in args.thresholds:
            f = DedupFilter(DedupFilter.Params(on=on, threshold=thr))
            f.setup({"seed": 0})
            res = f.apply(Batch(table, image_emb=img, text_emb=txt))
            keeper = {}
            for u, k, r in zip(uids, res.keep, res.reason):
                keeper[u] = u if k else r[len("duplicate of "):][:32]
            hit = [keeper[u] == keeper[root[u]] for u in dups]
            exact = [h for u, h in zip(dups, hit) if noise.get(u) == "exact_dup"]
            nearh = [h for u, h in zip(dups, hit) if noise.get(u) != "exact_dup"]
            dropped = [u for u, k in zip(uids, res.keep) if not k]
            correct = sum(root.get(u, u) == root.get(keeper[u], keeper[u]) for u in dropped)
            print(f"| {thr} | {on} | {len(dropped)} | {np.mean(hit):.3f} ({np.mean(exact):.3f} of {len(exact)} / "
                  f"{np.mean(nearh):.3f} of {len(nearh)}) | {correct / max(1, len(dropped)):.3f} |")


def start_child(side: str, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "perf.bench_dedup", "--child", side, "--n", str(args.n), "--d", str(args.d),
           "--pairs", str(args.pairs), "--sample", str(args.sample), "--index", args.index]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_child(side: str, proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.stderr.write(err)
        raise SystemExit(f"{side} child failed")
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=10_000)
    ap.add_argument("--sample", type=int, default=100_000)
    ap.add_argument("--index", default="auto")
    ap.add_argument("--child", choices=["ours", "exact"])
    ap.add_argument("--concurrent", action="store_true",
                    help="run both sides at once (each still its own process; compare CPU seconds, not wall)")
    ap.add_argument("--quality", metavar="POOL", help="measure recall/precision on a downloaded + embedded pool")
    ap.add_argument("--truth", help="the offline pool builder's truth.parquet (with --quality)")
    ap.add_argument("--model-id", help="embeddings folder to use (default: the pool's first)")
    ap.add_argument("--embed", choices=["pool", "thumbnails"], default="pool",
                    help="image vectors: the pool's embeddings, or pixel thumbnails read from its shards")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.95, 0.98, 0.99])
    ap.add_argument("--quick", action="store_true", help="perf.run_all's size: 20,000 x 512, 200 pairs, sample 5,000")
    ap.add_argument("--json", help="write the result (perf/result.py's shape) to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.pairs, args.sample = 20_000, 200, 5_000
    if args.quality:
        quality(args)
        return
    if args.child:
        res = child_ours(args) if args.child == "ours" else child_exact(args)
        res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return
    if args.concurrent:
        procs = {side: start_child(side, args) for side in ("ours", "exact")}
        ours, exact = (finish_child(side, procs[side]) for side in ("ours", "exact"))
    else:
        ours = finish_child("ours", start_child("ours", args))
        exact = finish_child("exact", start_child("exact", args))
    scale = (args.n / args.sample) ** 2
    exact_full = exact["wall_s"] * scale
    data_mib = args.n * args.d * 4 / 2**20
    print(f"# bench_dedup: n={args.n:,} d={args.d} planted pairs={args.pairs:,} cores={os.cpu_count()} "
          f"{'both sides concurrently' if args.concurrent else 'one side after the other'}, "
          f"({platform.processor() or platform.machine()}), load avg at end {os.getloadavg()[0]:.1f}")
    print(f"ours ({ours['index']}): dedup wall {ours['wall_s']:.1f} s, peak RSS {ours['peak_rss_mib']:.0f} MiB "
          f"(the float32 embeddings alone are {data_mib:.0f} MiB), recall of planted pairs {ours['recall']:.4f}, "
          f"rows dropped {ours['dropped']:,} (outside planted pairs: {ours['dropped_outside_planted']:,})")
    print(f"exact ({exact['index']}) on a {args.sample:,} sample: {exact['wall_s']:.1f} s, peak RSS "
          f"{exact['peak_rss_mib']:.0f} MiB, recall on the {exact['pairs_in_sample']} planted pairs inside "
          f"the sample {exact['recall_in_sample']:.4f}")
    print(f"exact extrapolated to n={args.n:,}: {exact['wall_s']:.1f} s x ({args.n:,}/{args.sample:,})^2 = "
          f"{exact_full:,.0f} s ({exact_full / 3600:.1f} h)")
    cpu_full = exact["cpu_s"] * scale
    print(f"CPU seconds (robust to other load on the machine): ours {ours['cpu_s']:.0f}, exact on the sample "
          f"{exact['cpu_s']:.0f} -> extrapolated {cpu_full:,.0f}")
    print(f"speed-up vs exact: {exact_full / ours['wall_s']:.1f}x wall, {cpu_full / ours['cpu_s']:.1f}x CPU")
    from perf.result import bench_result, write

    # CPU seconds: the exact side is extrapolated from its sample, and CPU is robust to other load
    write(args.json, bench_result("dedup", ours["cpu_s"], cpu_full, "CPU s", higher_is_better=False,
                                  baseline_name="exact IndexFlatIP (extrapolated)",
                                  details={"n": args.n, "recall": ours["recall"], "peak_rss_mib": ours["peak_rss_mib"],
                                           "data_mib": data_mib, "exact_sample": args.sample, "ours": ours,
                                           "exact": exact}))


if __name__ == "__main__":
    main()
