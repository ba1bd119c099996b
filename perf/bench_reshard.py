"""Reshard throughput: `curate reshard` versus a straightforward single-process DataComp resharder.

The baseline is DataComp's algorithm written plainly: stream every pool tar with webdataset, look up
each sample's uid by binary search in the memory-mapped sorted uids.npy, write it (once per copy,
keys {uid}-{j} when repeated) with webdataset's ShardWriter. `curate reshard` plans from the metadata
parquet, skips the bytes of samples outside the subset, and runs one process per output shard.
Both run side by side on the same pool and subset; outputs are checked to hold the same samples.

    nice .venv/bin/python -m perf.bench_reshard [--shards 6 --per-shard 1500 --keep 0.3 --repeats 2]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def baseline_reshard(subset: Path, pool: Path, out: Path, shard_size: int) -> int:
    """Single-process DataComp-style resharder (the reference we compare against)."""
    import webdataset as wds

    from curate.core import uids as uidlib

    arr = uidlib.load(subset / "uids.npy", mmap=True)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    with wds.ShardWriter(str(out / "%08d.tar"), maxcount=shard_size, verbose=0) as sink:
        tars = sorted(str(p) for p in (pool / "shards").glob("*.tar"))
        for sample in wds.WebDataset(tars, shardshuffle=False):
            meta = json.loads(sample["json"])
            u = meta["uid"]
            q = np.array([(int(u[:16], 16), int(u[16:], 16))], dtype=uidlib.UID_DTYPE)
            lo = int(np.searchsorted(arr, q, side="left")[0])
            hi = int(np.searchsorted(arr, q, side="right")[0])
            copies = hi - lo
            for j in range(copies):
                key = u if copies == 1 else f"{u}-{j}"
                sink.write({"__key__": key, "jpg": sample["jpg"], "txt": sample["txt"],
                            "json": json.dumps(dict(meta, key=key)).encode()})
                n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=6)
    ap.add_argument("--per-shard", type=int, default=1500)
    ap.add_argument("--image-size", type=int, default=160)
    ap.add_argument("--keep", type=float, default=0.3, help="fraction of the pool in the subset")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="perf.run_all's size: 3 shards x 500, 1 repeat")
    ap.add_argument("--json", help="write the result (perf/result.py's shape) to this file")
    args = ap.parse_args()
    if args.quick:
        args.shards, args.per_shard, args.repeats = 3, 500, 1

    from curate.core import uids as uidlib
    from curate.reshard.stage import ReshardConfig, reshard
    from tests.pool_factory import make_pool

    # one-time imports (webdataset pulls torch; pyarrow.dataset pulls pandas) are paid before timing
    import pyarrow.dataset  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import tqdm  # noqa: F401
    import webdataset  # noqa: F401

    root = Path(tempfile.mkdtemp(prefix="bench_reshard_"))
    try:
        t0 = time.perf_counter()
        fp = make_pool(root / "pool", n_shards=args.shards, per_shard=args.per_shard, corrupt=0, failed=0,
                       image_size=args.image_size)
        ok = fp.success_uids()
        rng = random.Random(0)
        chosen = rng.sample(ok, int(len(ok) * args.keep))
        chosen += chosen[: len(chosen) // 10]  # 10% upsampled twice
        subset = root / "subset"
        uidlib.save(subset / "uids.npy", chosen)
        pool_mb = sum(p.stat().st_size for p in (fp.pool / "shards").glob("*.tar")) / 1e6
        print(f"pool: {len(ok)} samples, {pool_mb:.1f} MB; subset rows {len(chosen)} "
              f"(built in {time.perf_counter() - t0:.1f}s)")
        base_t, ours_t, ours1_t = [], [], []
        for r in range(args.repeats):
            shutil.rmtree(root / "base", ignore_errors=True)
            t = time.perf_counter()
            n_base = baseline_reshard(subset, fp.pool, root / "base", 10_000)
            base_t.append(time.perf_counter() - t)
            for workers, times in ((args.workers, ours_t), (1, ours1_t)):
                shutil.rmtree(subset / "shards", ignore_errors=True)
                t = time.perf_counter()
                s = reshard(ReshardConfig(subset=subset, pool=fp.pool, shard_size=10_000 // 4, workers=workers,
                                          progress=False))
                times.append(time.perf_counter() - t)
                assert s["n_written"] == n_base == len(chosen), (s["n_written"], n_base, len(chosen))
            print(f"repeat {r}: baseline {base_t[-1]:.2f}s, curate ({args.workers} workers) {ours_t[-1]:.2f}s, "
                  f"curate (1 worker) {ours1_t[-1]:.2f}s", flush=True)
        b, o, o1 = statistics.median(base_t), statistics.median(ours_t), statistics.median(ours1_t)
        print(f"RESULT samples={n_base} baseline={n_base / b:.0f} samples/s; curate {args.workers}w="
              f"{n_base / o:.0f} samples/s ({b / o:.2f}x); curate 1w={n_base / o1:.0f} samples/s ({b / o1:.2f}x)")
        from perf.result import bench_result, write

        write(args.json, bench_result("reshard", n_base / o, n_base / b, "samples/s", goal=1.5,
                                      baseline_name="single-process DataComp resharder",
                                      details={"samples": n_base, "curate_1_worker_samples_per_s": n_base / o1,
                                               "workers": args.workers, "repeats": args.repeats}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
