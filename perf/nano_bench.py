"""The laptop-scale benchmark's moving parts, shared by `perf.calibrate_nano` and `perf.filtering_experiment`.

One *cell* is one (subset, seed): reshard the subset (once per subset), train it at the `nano` scale
(benchmark/scales.py) and evaluate suite v2 (benchmark/tasks.py `OFFLINE_V2_KEYS`). Everything is a stage
function of the toolkit that skips finished work, so a killed calibration or experiment resumes at the next
unfinished cell. The work folder holds:

    WORK/pool_build/   `curate pool build-offline --size large` (truth.parquet, trusted.parquet, urls.parquet)
    WORK/pool/         the pool downloaded from it (img2dataset, 64 px: the nano model trains at 64 px)
    WORK/evalsets/     `curate evalsets build-offline --pool-dir WORK/pool_build` (suite v2 + digits, Fashion-MNIST)
    WORK/subsets/NAME/ uids.npy + manifest.json (+ shards/ after reshard)
    WORK/runs/NAME/nano-seedS/   training run + eval_results.jsonl + per-item files

Each cell records wall seconds, CPU seconds (this process and its children) and the load average before and
after, so a figure taken on a busy machine is visibly one.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

SCALE = "nano"
PORT = 8643
IMAGE_SIZE = 64  # download resize target: the nano scale's model (curate-tiny) trains at 64 px


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its waited-for children."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def load() -> float:
    return round(os.getloadavg()[0], 2)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("+local-changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def prepare(work: Path, progress: bool = False) -> dict:
    """Build the large offline pool, serve and download it, build suite v2; each step skips finished work."""
    from benchmark.evalsets import BuildOfflineConfig, build_offline as build_evalsets
    from curate.pool.download import DownloadConfig, download
    from curate.pool.offline.build import OfflinePoolConfig, build_offline
    from curate.pool.serve import running_server

    work.mkdir(parents=True, exist_ok=True)
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    build_offline(OfflinePoolConfig(out=work / "pool_build", size="large", seed=0,
                                    base_url=f"http://127.0.0.1:{PORT}", progress=progress))
    t["build"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pool_json = work / "pool" / "pool.json"
    done = pool_json.is_file() and json.loads(pool_json.read_text()).get("state") == "complete"
    if not done:
        with running_server(work / "pool_build", port=PORT):
            download(DownloadConfig(urls=work / "pool_build" / "urls.parquet", out=work / "pool", image_size=IMAGE_SIZE,
                                    progress=progress, echo=False, allow_loopback=True))  # served on 127.0.0.1
    t["download"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_evalsets(BuildOfflineConfig(out=work / "evalsets", pool_dir=work / "pool_build"))
    t["evalsets"] = time.perf_counter() - t0
    return {k: round(v, 1) for k, v in t.items()}


def success_uids(pool: Path) -> list[str]:
    """uids of the pool's downloaded rows (status success), sorted."""
    import duckdb

    con = duckdb.connect()
    glob = str(pool / "metadata" / "*.parquet").replace("'", "''")
    rows = con.execute(f"SELECT uid FROM read_parquet('{glob}') WHERE status = 'success' ORDER BY uid").fetchall()
    con.close()
    return [r[0] for r in rows]


def write_subset(subset: Path, uids: list[str], pool: Path, name: str, rule: str, counts: dict) -> None:
    """SUBSET/uids.npy + manifest.json, rewritten only when the uid list changed (keeps reshard and runs valid)."""
    from curate.core import uids as uidlib

    uidlib.write_subset(subset, uids, {"recipe": {"name": name, "rule": rule}, "pool": str(pool.resolve()),
                                       "counts": {"subset": len(uids), **counts}})


def run_cell(work: Path, subset: Path, name: str, seed: int, tasks: list[str], progress: bool = False) -> dict:
    """Reshard `subset` (cached), train it at `nano` with `seed`, evaluate `tasks`; return the cell record."""
    from benchmark.evaluate import EvalConfig, evaluate
    from benchmark.train import TrainConfig, stale_run, train
    from curate.reshard.stage import ReshardConfig, reshard

    rec: dict = {"name": name, "seed": seed, "load_start": load()}
    t0, c0 = time.perf_counter(), cpu_seconds()
    reshard(ReshardConfig(subset=subset, pool=work / "pool", progress=progress))
    rec["reshard_seconds"] = round(time.perf_counter() - t0, 1)
    run = work / "runs" / name / f"{SCALE}-seed{seed}"
    if stale_run(run, subset):
        import shutil

        shutil.rmtree(run)
    t1 = time.perf_counter()
    info = train(TrainConfig(data=subset, scale=SCALE, out=run, seed=seed, resume=True, progress=progress))
    rec["train_seconds"] = round(time.perf_counter() - t1, 1)
    t2 = time.perf_counter()
    ev = evaluate(EvalConfig(run=run, tasks=tasks, evalsets=work / "evalsets", progress=progress))
    rec["eval_seconds"] = round(time.perf_counter() - t2, 1)
    rec.update(run=str(run), seconds=round(time.perf_counter() - t0, 1), cpu_seconds=round(cpu_seconds() - c0, 1),
               load_end=load(), steps=info.get("steps"), subset_rows=_rows(subset),
               scores={k: _main(r) for k, r in ev["results"].items()},
               missing=sorted(ev.get("missing", {})))
    return rec


def _rows(subset: Path) -> int:
    from curate.core import uids as uidlib

    return int(len(uidlib.load(subset / "uids.npy")))


def _main(r: dict):
    v = r.get("metrics", {}).get(r.get("main_metric"))
    return None if v is None else float(v)


def chance_levels(evalsets: Path, keys: list[str]) -> dict[str, float | None]:
    """Each task's chance level for its main metric, from its built set (benchmark.leaderboard.chance_level)."""
    from benchmark.leaderboard import chance_level

    return {k: chance_level(k, evalsets_root=evalsets) for k in keys}


def item_intervals(run: Path, level: float = 0.95) -> dict[str, dict]:
    """Per task of a run: the main metric's item-level interval (benchmark.stats.task_interval)."""
    from benchmark import stats as S
    from benchmark.leaderboard import item_cells
    from benchmark.results import read_results

    rfile = run / "eval_results.jsonl"
    cells, _ = item_cells(rfile, read_results(rfile))
    out = {}
    for i, (k, c) in enumerate(sorted(cells.items())):
        iv = S.task_interval(c, level=level, seed=i)
        out[k] = {"estimate": iv.estimate, "low": iv.low, "high": iv.high, "method": iv.method, "n": iv.n}
    return out
