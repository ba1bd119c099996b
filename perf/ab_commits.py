"""A/B of three stages (filter, reshard, embed) between two commits, to show that a refactor costs nothing.

The commits are checked out into temporary git worktrees (B defaults to the working tree); both trees run the same stage on the same inputs in
fresh processes, alternating A, B, A, B, ... so drift in the machine's load hits both sides alike. Only the stage
call is timed (process start and imports are not). Inputs are built once, with the working tree's test factories:

- filter: `recipes/no_filter.yaml` and a clip-score + dedup recipe on a metadata + embeddings pool
  (tests/metadata_factory.py, 64-d vectors), no report;
- reshard: 30% of an image pool (tests/pool_factory.py) into shards of 1,000;
- embed: the project's `curate-tiny` architecture with random weights over the same image pool.

    .venv/bin/python -m perf.ab_commits --base 7a9fc99 [--head 198e71a] [--repeats 3] [--rows 200000] [--images 1200]

Prints one line per stage: median seconds per side, B/A, and whether it is within the stated tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# stage function and config, by module path in either layout (before and after the stage packages)
NAMES = {
    "filter": (("curate.filter.engine", "curate.filter"), "FilterConfig", "filter_pool"),
    "reshard": (("curate.reshard.stage", "curate.reshard"), "ReshardConfig", "reshard"),
    "embed": (("curate.embed.stage", "curate.embed"), "EmbedConfig", "embed"),
}

CLIP_DEDUP = """name: ab_clip_dedup
steps:
  - clip_score: {model: curate-debug, keep_top_fraction: 0.5}
  - dedup: {on: image, threshold: 0.95}
"""


def build_inputs(work: Path, rows: int, images: int) -> dict:
    """Fixtures shared by both sides (built with this tree's factories, read by either tree's code)."""
    sys.path.insert(0, str(REPO))
    from tests.metadata_factory import write_embeddings, write_metadata
    from tests.pool_factory import make_pool

    meta_pool = work / "meta_pool"
    if not (meta_pool / "metadata").is_dir():
        write_metadata(meta_pool, n_rows=rows, n_files=4, seed=0)
        write_embeddings(meta_pool, "curate-debug__0123456789ab", dim=64, seed=0)
    per_shard = max(1, images // 4)
    img_pool = work / "img_pool"
    if not (img_pool / "metadata").is_dir():
        make_pool(img_pool, n_shards=4, per_shard=per_shard, corrupt=0, failed=0, image_size=96)
    (work / "clip_dedup.yaml").write_text(CLIP_DEDUP)
    subset = work / "subset"
    if not (subset / "uids.npy").is_file():
        import pyarrow.parquet as pq

        from curate.core import uids as uidlib

        u = sorted(pq.read_table(img_pool / "metadata").column("uid").to_pylist())
        subset.mkdir(parents=True, exist_ok=True)
        uidlib.save(subset / "uids.npy", u[: int(len(u) * 0.3)])
        (subset / "manifest.json").write_text(json.dumps({"pool": str(img_pool.resolve())}))
    return {"meta_pool": str(meta_pool), "img_pool": str(img_pool), "subset": str(subset),
            "clip_dedup": str(work / "clip_dedup.yaml")}


def run_stage(stage: str, inputs: dict, scratch: Path) -> tuple[float, str]:
    """Child side: run one stage once with whatever tree is first on sys.path; return (seconds, module file)."""
    import importlib

    modules, cfg_name, fn_name = NAMES[stage]
    for m in modules:
        try:
            mod = importlib.import_module(m)
            if hasattr(mod, fn_name) and hasattr(mod, cfg_name):
                break
        except ImportError:
            continue
    cfg_cls, fn = getattr(mod, cfg_name), getattr(mod, fn_name)
    if scratch.exists():
        shutil.rmtree(scratch)
    if stage == "filter":
        runs = [cfg_cls(recipe=str(REPO / "recipes" / "no_filter.yaml"), pool=inputs["meta_pool"],
                        out=str(scratch / "nf"), report=False, progress=False),
                cfg_cls(recipe=inputs["clip_dedup"], pool=inputs["meta_pool"], out=str(scratch / "cd"),
                        report=False, progress=False)]
    elif stage == "reshard":
        runs = [cfg_cls(subset=Path(inputs["subset"]), pool=Path(inputs["img_pool"]), shard_size=1000,
                        out=scratch / "shards", progress=False)]
    else:
        shutil.rmtree(Path(inputs["img_pool"]) / "embeddings", ignore_errors=True)
        runs = [cfg_cls(pool=Path(inputs["img_pool"]), model="curate-tiny", pretrained=None, batch_size=100,
                        progress=False)]
    t0 = time.perf_counter()
    for cfg in runs:
        fn(cfg)
    return time.perf_counter() - t0, str(Path(mod.__file__).resolve())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="7a9fc99", help="commit A")
    ap.add_argument("--head", default=None, help="commit B [default: the working tree as it is]")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, default=200_000, help="metadata rows for the filter")
    ap.add_argument("--images", type=int, default=1200, help="images in the pool for reshard and embed")
    ap.add_argument("--stages", default="filter,reshard,embed")
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--child", nargs=3, metavar=("STAGE", "INPUTS", "SCRATCH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        stage, inputs, scratch = a.child
        seconds, module = run_stage(stage, json.loads(inputs), Path(scratch))
        print(json.dumps({"seconds": seconds, "module": module}))
        return

    work = a.work or Path(tempfile.mkdtemp(prefix="curate_ab_"))
    work.mkdir(parents=True, exist_ok=True)
    inputs = build_inputs(work, a.rows, a.images)
    trees = {"A": work / "tree_A", "B": work / "tree_B" if a.head else REPO}
    for side, commit in (("A", a.base), ("B", a.head)):
        if commit and not trees[side].is_dir():
            subprocess.run(["git", "worktree", "add", "--detach", str(trees[side]), commit], cwd=REPO, check=True,
                           capture_output=True)
    load0 = os.getloadavg()
    times: dict[str, dict[str, list[float]]] = {s: {"A": [], "B": []} for s in a.stages.split(",")}
    try:
        for stage in times:
            for _ in range(a.repeats):
                for side, tree in trees.items():
                    env = {**os.environ, "PYTHONPATH": str(tree), "NO_ALBUMENTATIONS_UPDATE": "1"}
                    # the child script is always this file, run with the side's tree first on sys.path
                    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", stage,
                                        json.dumps(inputs), str(work / f"scratch_{side}")],
                                       cwd=tree, env=env, capture_output=True, text=True)
                    if r.returncode:
                        raise SystemExit(f"{stage} on side {side} failed:\n{r.stderr[-3000:]}")
                    res = json.loads(r.stdout.strip().splitlines()[-1])
                    if not Path(res["module"]).is_relative_to(tree.resolve()):
                        raise SystemExit(f"side {side} ran {res['module']}, not the code in {tree}")
                    times[stage][side].append(res["seconds"])
    finally:
        for side, tree in trees.items():
            if tree != REPO:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True)
    load1 = os.getloadavg()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    b_name = a.head or f"the working tree at {head} (+ uncommitted changes if any)"
    print(f"A = {a.base}, B = {b_name}; median of {a.repeats}, "
          f"alternating; load average {load0[0]:.2f} -> {load1[0]:.2f}")
    for stage, t in times.items():
        ma, mb = statistics.median(t["A"]), statistics.median(t["B"])
        ratio = mb / ma
        verdict = "within" if abs(ratio - 1) <= a.tolerance else "OUTSIDE"
        print(f"  {stage:<8} A {ma:7.2f} s   B {mb:7.2f} s   B/A {ratio:5.3f}   {verdict} ±{a.tolerance:.0%}   "
              f"(A {', '.join(f'{x:.2f}' for x in t['A'])}; B {', '.join(f'{x:.2f}' for x in t['B'])})")


if __name__ == "__main__":
    main()
