"""Benchmark: `clip_l14_30pct` on a DataComp-format pool, curate vs DataComp's reference approach.

Workload (issue 11): a 12.8M-row pool in DataComp's released format (26 parquet + npz pairs, as the
small pool; tests/datacomp_factory.py), imported in place with `curate pool import-datacomp`.

- reference: what DataComp's ``baselines.py --name clip_score_l14_30_percent`` does, written out
  here: a process pool of 2 reads the score column of every parquet with pandas, the threshold is
  a full descending sort's element at ``int(N * 0.3)``; then the pool reads (uid, score) per file,
  keeps ``score >= threshold`` and parses each kept uid in Python (``int(uid[:16], 16)``), the
  concatenated array is sorted and saved.
- select: `curate pool select-datacomp` (curate.filter.datacomp_select.select_uids) with
  ``recipes/clip_l14_30pct.yaml`` plus ``datacomp_ties: true`` (DataComp's own tie rule, so the
  outputs can be compared byte for byte): read -> threshold -> uids.npy, streamed.
- filter: `curate.filter.engine.filter_pool` with the same recipe, no report. It writes everything `curate
  filter` always writes (per-uid ledger, subset.parquet with url/text, manifest), not only uids.npy.

Each side runs in its own fresh subprocess (``python -m perf.bench_datacomp --side ...``); wall time
and that child's peak RSS (``os.wait4`` ru_maxrss) are measured by the parent. uids.npy must be
byte-identical or the run fails.

    nice .venv/bin/python -m perf.bench_datacomp                  # 12.8M rows (data cached in --work)
    .venv/bin/python -m perf.bench_datacomp --rows 1280000        # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
KEY = "clip_l14_similarity_score"
SIDES = ("reference", "select", "filter")


def generate(work: Path, rows: int, files: int) -> Path:
    """DataComp-format files (npz with 2-dim vectors: this workload never reads them) + the import."""
    sys.path.insert(0, str(REPO / "tests"))
    from datacomp_factory import write_datacomp_pool

    from curate.pool.datacomp import ImportConfig, import_datacomp

    src = work / "datacomp_metadata"
    marker = src / "bench.json"
    want = {"rows": rows, "files": files, "seed": 0}
    if not (marker.exists() and json.loads(marker.read_text()) == want):
        t = time.time()
        for f in src.glob("*"):
            f.unlink()
        write_datacomp_pool(src, n_rows=rows, n_files=files, seed=0, dims={"b32": 2, "l14": 2})
        marker.write_text(json.dumps(want))
        print(f"generated {rows} rows in {files} files in {time.time() - t:.1f}s -> {src}", flush=True)
    pool = work / "pool"
    import_datacomp(ImportConfig(metadata_dir=src, out=pool, check_uids=False))
    return pool


# ---------------------------------------------------------------- reference (DataComp's approach)

def _ref_scores(path: str):
    import pandas as pd

    return pd.read_parquet(path, columns=[KEY])


def _ref_uids(args: tuple[str, float]):
    import pandas as pd

    path, threshold = args
    df = pd.read_parquet(path, columns=["uid", KEY])
    return np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in df[df[KEY] >= threshold]["uid"].values],
                    np.dtype("u8,u8"))


def reference(src: Path, out: Path, fraction: float, workers: int) -> None:
    import multiprocessing as mp

    import pandas as pd

    paths = sorted(str(p) for p in src.glob("*.parquet"))
    with mp.Pool(workers) as pool:
        df = pd.concat(list(pool.imap_unordered(_ref_scores, paths)))
    n = int(len(df) * fraction)
    threshold = -np.sort(-df[KEY].values)[n]
    del df
    with mp.Pool(workers) as pool:
        uids = np.concatenate(list(pool.imap_unordered(_ref_uids, [(p, threshold) for p in paths])))
    uids.sort()
    np.save(out / "uids.npy", uids)


# ---------------------------------------------------------------- ours

def _recipe(out: Path, fraction: float) -> Path:
    recipe = out / "clip_l14_30pct_datacomp_ties.yaml"
    base = (REPO / "recipes" / "clip_l14_30pct.yaml").read_text()
    recipe.write_text(base.replace("keep_top_fraction: 0.3}", f"keep_top_fraction: {fraction}, datacomp_ties: true}}"))
    return recipe


def select(pool: Path, out: Path, fraction: float) -> None:
    from curate.filter.datacomp_select import SelectConfig, select_uids

    s = select_uids(SelectConfig(recipe=str(_recipe(out, fraction)), pool=str(pool), out=str(out / "uids.npy")))
    print(json.dumps({"kept": s["kept"], "threshold": s["threshold"]}), file=sys.stderr)


def ours(pool: Path, out: Path, fraction: float) -> None:
    from curate.filter.engine import FilterConfig, filter_pool

    recipe = _recipe(out, fraction)
    s = filter_pool(FilterConfig(recipe=str(recipe), pool=str(pool), out=str(out / "subset"), report=False,
                                 progress=False))
    os.replace(out / "subset" / "uids.npy", out / "uids.npy")
    print(json.dumps({"kept": s["kept"], "steps": s["steps"]}, default=str), file=sys.stderr)


def run_side(side: str, args) -> dict:
    out = Path(args.work) / f"out_{side}"
    out.mkdir(parents=True, exist_ok=True)
    for f in out.rglob("*"):
        if f.is_file():
            f.unlink()
    cmd = [sys.executable, "-m", "perf.bench_datacomp", "--side", side, "--work", args.work,
           "--fraction", str(args.fraction), "--workers", str(args.workers)]
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.time() - t0
    if status != 0:
        raise SystemExit(f"{side} failed with status {status}")
    return {"side": side, "wall_s": round(wall, 2), "peak_rss_gb": round(ru.ru_maxrss / 1e6, 3),
            "cpu_s": round(ru.ru_utime + ru.ru_stime, 2), "uids": str(out / "uids.npy")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=12_800_000)
    ap.add_argument("--files", type=int, default=26)
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--workers", type=int, default=2, help="reference process pool size")
    ap.add_argument("--work", default=str(REPO / "work" / "bench_datacomp"))
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of " + ",".join(SIDES))
    ap.add_argument("--repeats", type=int, default=1, help="alternate the sides this many times; report the best")
    args = ap.parse_args()
    work = Path(args.work)
    if args.side == "reference":
        return reference(work / "datacomp_metadata", work / "out_reference", args.fraction, args.workers)
    if args.side == "filter":
        return ours(work / "pool", work / "out_filter", args.fraction)
    if args.side == "select":
        return select(work / "pool", work / "out_select", args.fraction)
    work.mkdir(parents=True, exist_ok=True)
    generate(work, args.rows, args.files)
    sides = ["reference"] + [s for s in args.sides.split(",") if s in SIDES and s != "reference"]
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for _ in range(args.repeats):
        for side in sides:
            r = run_side(side, args)
            results[side].append(r)
            print(json.dumps(r), flush=True)
    ref_bytes = Path(results["reference"][-1]["uids"]).read_bytes()
    for s in sides[1:]:
        if Path(results[s][-1]["uids"]).read_bytes() != ref_bytes:
            raise SystemExit(f"uids.npy differ between reference and {s}")
    best = {s: min(rs, key=lambda r: r["wall_s"]) for s, rs in results.items()}
    ref = best["reference"]
    summary = {"rows": args.rows, "files": args.files, "kept": len(np.load(ref["uids"])), "identical_uids_npy": True,
               "reference": ref}
    for s in sides[1:]:
        us = best[s]
        summary[s] = {**us, "speedup_wall": round(ref["wall_s"] / us["wall_s"], 2),
                      "speedup_cpu": round(ref["cpu_s"] / max(us["cpu_s"], 1e-9), 2),
                      "memory_ratio": round(us["peak_rss_gb"] / ref["peak_rss_gb"], 3)}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
