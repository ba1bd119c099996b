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
- filter: `curate filter --recipe ... --pool POOL --out OUT --no-report` (the command users run, invoked
  in-process through curate.cli). It writes everything `curate filter` always writes (ledger,
  subset.parquet with url/text/face_bboxes, manifest), not only uids.npy; on a pool of >= 1M rows the
  ledger is the compact form (`--ledger auto`, docs/FORMATS.md "Compact ledger"). The parent checks
  that subset.parquet holds exactly the kept uids. ``--ledger full`` measures the per-(uid, step) form.

Each side runs in its own fresh subprocess (``python -m perf.bench_datacomp --side ...``); wall time
and that child's peak RSS (``os.wait4`` ru_maxrss) are measured by the parent. uids.npy must be
byte-identical or the run fails.

    nice .venv/bin/python -m perf.bench_datacomp                  # 12.8M rows (data cached in --work)
    .venv/bin/python -m perf.bench_datacomp --rows 1280000        # quicker
    .venv/bin/python -m perf.bench_datacomp --quick --json r.json # perf.run_all's size, machine-readable
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


def ours(pool: Path, out: Path, fraction: float, ledger: str = "auto") -> None:
    from curate.cli import main as curate_main

    recipe = _recipe(out, fraction)
    curate_main(["filter", "--recipe", str(recipe), "--pool", str(pool), "--out", str(out / "subset"), "--no-report",
                 "--ledger", ledger], standalone_mode=False)
    os.replace(out / "subset" / "uids.npy", out / "uids.npy")


def check_subset(out: Path) -> int:
    """subset.parquet's uids, sorted, must be uids.npy exactly; returns the row count."""
    import pyarrow.parquet as pq

    from curate.filter.datacomp_select import encode_uid_array, sort_uids

    sub = encode_uid_array(pq.read_table(out / "subset" / "subset.parquet", columns=["uid"])["uid"])
    sort_uids(sub)
    if not np.array_equal(sub, np.load(out / "uids.npy")):
        raise SystemExit("subset.parquet's uids differ from uids.npy")
    return len(sub)


def run_side(side: str, args) -> dict:
    out = Path(args.work) / f"out_{side}"
    out.mkdir(parents=True, exist_ok=True)
    for f in out.rglob("*"):
        if f.is_file():
            f.unlink()
    cmd = [sys.executable, "-m", "perf.bench_datacomp", "--side", side, "--work", args.work,
           "--fraction", str(args.fraction), "--workers", str(args.workers), "--ledger", args.ledger]
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.time() - t0
    if status != 0:
        raise SystemExit(f"{side} failed with status {status}")
    r = {"side": side, "wall_s": round(wall, 2), "peak_rss_gb": round(ru.ru_maxrss / 1e6, 3),
         "cpu_s": round(ru.ru_utime + ru.ru_stime, 2), "uids": str(out / "uids.npy")}
    if side == "filter":  # the subset must be written and hold exactly the kept uids (checked in a child: see run)
        chk = subprocess.run([sys.executable, "-m", "perf.bench_datacomp", "--check-subset", str(out)], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
        if chk.returncode != 0:
            raise SystemExit(f"filter: {chk.stdout}{chk.stderr}")
        r["subset_rows"] = int(chk.stdout.split()[-1])
        r["ledger"] = json.loads((out / "subset" / "manifest.json").read_text()).get("ledger", {}).get("form", "full")
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=12_800_000)
    ap.add_argument("--files", type=int, default=26)
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--workers", type=int, default=2, help="reference process pool size")
    ap.add_argument("--work", default=None, help="data cache [default: work/bench_datacomp, _quick with --quick]")
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of " + ",".join(SIDES))
    ap.add_argument("--repeats", type=int, default=1, help="alternate the sides this many times; report the best")
    ap.add_argument("--ledger", default="auto", choices=["auto", "full", "compact"], help="`curate filter --ledger`")
    ap.add_argument("--quick", action="store_true", help="1.28M rows in 4 files (perf.run_all's quick size)")
    ap.add_argument("--json", type=Path, help="also write the summary to this file")
    ap.add_argument("--check-subset", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.check_subset:
        print("subset rows", check_subset(args.check_subset))
        return
    if args.quick:
        args.rows, args.files = 1_280_000, 4
        if args.ledger == "auto":
            args.ledger = "compact"  # the form 12.8M rows get, measured at the quick size
    args.work = args.work or str(REPO / "work" / ("bench_datacomp_quick" if args.quick else "bench_datacomp"))
    if args.side:
        run(args)
        return
    print(json.dumps(run(args), indent=1))


def run(args) -> dict:
    """Generate (cached), run the sides, check uids.npy bytes; return the summary dict."""
    work = Path(args.work)
    if args.side == "reference":
        return reference(work / "datacomp_metadata", work / "out_reference", args.fraction, args.workers)
    if args.side == "filter":
        return ours(work / "pool", work / "out_filter", args.fraction, args.ledger)
    if args.side == "select":
        return select(work / "pool", work / "out_select", args.fraction)
    work.mkdir(parents=True, exist_ok=True)
    # In a child: the sides' peak RSS (ru_maxrss) starts from the parent's RSS at fork, so the parent
    # must stay small (generating 12.8M rows here would inflate every side's figure).
    subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; import perf.bench_datacomp as b; "
                    "b.generate(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))", str(work), str(args.rows),
                    str(args.files)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
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
               "command": " ".join(["python -m perf.bench_datacomp"] + sys.argv[1:]), "reference": ref}
    for s in sides[1:]:
        us = best[s]
        summary[s] = {**us, "speedup_wall": round(ref["wall_s"] / us["wall_s"], 2),
                      "speedup_cpu": round(ref["cpu_s"] / max(us["cpu_s"], 1e-9), 2),
                      "memory_ratio": round(us["peak_rss_gb"] / ref["peak_rss_gb"], 3)}
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
