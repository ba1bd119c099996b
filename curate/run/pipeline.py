"""`curate run`: one command from a recipe to a leaderboard row (filter -> reshard -> train -> evaluate -> submit).

The stages are idempotent on their own (each compares fingerprints of its inputs and says "up to date"); this
module only orchestrates them: it fixes where each stage writes inside WORK, calls the stage functions directly
(no subprocesses, so models and errors stay in one process), shows one line per stage with its status and time,
and ends with the leaderboard table. Re-running a finished pipeline does no work; a changed recipe recomputes the
subset and everything downstream of it.

Layout under WORK (default ./work):

    subsets/<recipe>/                 filter output + shards/ (reshard)
    runs/<recipe>/<scale>-seed<k>/    train output (info.json, checkpoints, final.pt), eval_results.jsonl
    runs/<recipe>/<scale>-seed<k>/submission{,.tar.gz}   the verifiable bundle
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import click

from curate.core.errors import CurateError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


# ----------------------------------------------------------------------------------------------- stage display

@dataclass
class StageLog:
    """One line per stage: `[3/6] train tiny seed 1 ... done in 212.4 s (350 steps)` or `... up to date`."""

    total: int
    echo: Callable[[str], None] = click.echo
    done: int = 0
    records: list[dict] = field(default_factory=list)

    def run(self, title: str, fn: Callable[[], dict], detail: Callable[[dict], str] | None = None) -> dict:
        self.done += 1
        prefix = f"[{self.done}/{self.total}] {title}"
        self.echo(f"{prefix} ...")
        t0 = time.perf_counter()
        summary = fn() or {}
        dt = time.perf_counter() - t0
        status = "up to date" if summary.get("up_to_date") else f"done in {dt:.1f} s"
        extra = detail(summary) if detail else ""
        self.echo(f"{prefix}: {status}{(' — ' + extra) if extra else ''}")
        self.records.append({"stage": title, "status": "up_to_date" if summary.get("up_to_date") else "done",
                             "seconds": round(dt, 2), "detail": extra})
        return summary


# ----------------------------------------------------------------------------------------------- config

@dataclass
class RunConfig:
    """Inputs of `curate run`."""

    recipe: Path
    scale: str
    pool: Path | None = None  # default: the recipe's `pool:`
    seeds: list[int] = field(default_factory=lambda: [0])
    work: Path = Path("work")
    tasks: list[str] | None = None  # evaluation tasks; default offline suite for CPU scales, DataComp's otherwise
    evalsets: Path | None = None  # default: WORK/evalsets if it exists, else benchmark.evalsets' default
    pretrained: dict[str, str] = field(default_factory=dict)  # recipe model weights, as `curate filter --pretrained`
    db: Path | None = None  # leaderboard; default benchmark.leaderboard.default_db()
    name: str | None = None  # leaderboard name; default the recipe's name
    device: str = "auto"
    shard_size: int = 10_000
    train_workers: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        self.recipe = Path(self.recipe)
        self.work = Path(self.work)
        if not self.seeds:
            raise CurateError("--seeds: give at least one seed, e.g. --seeds 0,1,2")
        if len(set(self.seeds)) != len(self.seeds):
            raise CurateError(f"--seeds {','.join(map(str, self.seeds))}: a seed is listed twice")


def default_tasks(scale: str) -> list[str]:
    from benchmark.scales import get_scale

    return ["offline"] if get_scale(scale).cpu_scale else ["datacomp"]


def resolve_evalsets(cfg_evalsets: Path | None, work: Path) -> Path:
    from benchmark.evalsets import default_evalsets_dir

    if cfg_evalsets:
        return Path(cfg_evalsets)
    if os.environ.get("CURATE_EVALSETS"):
        return default_evalsets_dir()
    if (work / "evalsets").is_dir():
        return work / "evalsets"
    return default_evalsets_dir()


def run_dir_for(work: Path, recipe: str, scale: str, seed: int) -> Path:
    return work / "runs" / recipe / f"{scale}-seed{seed}"


# ----------------------------------------------------------------------------------------------- stage steps

def train_and_evaluate(subset: Path, run: Path, scale: str, seed: int, tasks: list[str], evalsets: Path,
                       device: str, workers: int, progress: bool, log: StageLog) -> dict:
    """Train one seed on SUBSET into RUN (resuming an interrupted run) and evaluate it; return eval summary."""
    from benchmark.evaluate import EvalConfig
    from benchmark.train import TrainConfig, stale_run, train

    if stale_run(run, subset):
        # RUN is this pipeline's own output for an older subset: the subset changed, so the run is recomputed
        shutil.rmtree(run)
    info = log.run(
        f"train {scale} seed {seed}",
        lambda: train(TrainConfig(data=subset, scale=scale, out=run, seed=seed, device=device, resume=True,
                                  workers=workers, progress=progress)),
        lambda s: f"{s.get('steps')} steps, {s.get('samples_seen')} samples seen",
    )
    final = run / info.get("final_checkpoint", "final.pt")
    ev = log.run(
        f"evaluate seed {seed}",
        lambda: _evaluate(EvalConfig(run=run, pretrained=str(final), tasks=tasks, evalsets=evalsets,
                                     device=device, progress=progress)),
        _eval_detail,
    )
    return ev


def _evaluate(cfg) -> dict:
    from benchmark.evaluate import evaluate

    s = evaluate(cfg)  # a stage summary (curate.core.stage): it says itself whether it was up to date
    if not s.get("results"):
        raise CurateError(f"no evaluation task could be scored from {s.get('evalsets')} ({len(s.get('missing', {}))} "
                          "missing); build the offline suite with `curate evalsets build-offline --pool-dir POOLBUILD`")
    return s


def _eval_detail(s: dict) -> str:
    from benchmark.results import average_score

    avg, _ = average_score(list(s.get("results", {}).values()))
    return f"{len(s.get('results', {}))} tasks, average {avg:.4f}" if avg is not None else "no scored task"


def run_recipe(cfg: RunConfig, log: StageLog | None = None) -> dict:
    """Run the whole pipeline for one recipe and its seeds; return {subset, runs, bundles, standings}."""
    from benchmark.leaderboard import default_db, format_standings, standings
    from curate.filter.engine import FilterConfig, filter_pool
    from curate.filter.recipe import load_recipe
    from curate.reshard.stage import ReshardConfig, reshard

    recipe = load_recipe(cfg.recipe)
    pool = Path(cfg.pool) if cfg.pool else (Path(recipe.pool) if recipe.pool else None)
    if pool is None:
        raise CurateError(f"{cfg.recipe}: no pool given: pass --pool POOL or set `pool:` in the recipe")
    from curate.pool.pool import Pool

    pool = Pool.open(pool).path  # validated before any stage starts: a CurateError naming what is missing
    name = cfg.name or recipe.name
    subset = cfg.work / "subsets" / recipe.name
    tasks = cfg.tasks or default_tasks(cfg.scale)
    evalsets = resolve_evalsets(cfg.evalsets, cfg.work)
    db = Path(cfg.db) if cfg.db else default_db()
    log = log or StageLog(total=2 + 3 * len(cfg.seeds))
    log.run(f"filter {recipe.name}",
            lambda: filter_pool(FilterConfig(recipe=str(cfg.recipe), pool=str(pool), out=str(subset),
                                             pretrained=cfg.pretrained, device=cfg.device, progress=cfg.progress),
                                recipe),  # parsed once, above
            lambda s: f"{s.get('kept')} of {s.get('pool_rows')} rows kept")
    rs = log.run("reshard",
                 lambda: reshard(ReshardConfig(subset=subset, pool=pool, shard_size=cfg.shard_size,
                                               progress=cfg.progress)),
                 lambda s: f"{s.get('n_written')} samples in {s.get('n_shards')} shards")
    if not rs.get("n_written"):
        raise CurateError(f"{subset}: the recipe kept no sample that could be resharded; nothing to train on")
    runs, bundles = [], []
    for seed in cfg.seeds:
        run = run_dir_for(cfg.work, recipe.name, cfg.scale, seed)
        train_and_evaluate(subset, run, cfg.scale, seed, tasks, evalsets, cfg.device, cfg.train_workers,
                           cfg.progress, log)
        b = log.run(f"submit seed {seed}", lambda: _submit(run, name, db),
                    lambda s: f"bundle {s['bundle']}, average {s['average']:.4f}" if s.get("average") is not None else "")
        runs.append(str(run))
        bundles.append(b["bundle"])
    rows = standings(db, cfg.scale)
    return {"recipe": recipe.name, "name": name, "subset": str(subset), "runs": runs, "bundles": bundles,
            "db": str(db), "stages": log.records, "table": format_standings(rows)}


def _submit(run: Path, name: str, db: Path) -> dict:
    from benchmark.submit import SubmitConfig, submit

    return submit(SubmitConfig(run=run, name=name, leaderboard_db=db))


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CurateError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None


# ----------------------------------------------------------------------------------------------- CLI

@click.command("run")
@click.option("--recipe", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Recipe YAML (see recipes/).")
@click.option("--scale", required=True, help="Training scale from benchmark/scales.py (tiny and debug run on CPU).")
@click.option("--pool", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="POOL directory (default: the recipe's `pool:`).")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated training seeds, one run each.")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("work"), show_default=True,
              help="Folder for subsets/ and runs/.")
@click.option("--tasks", multiple=True, help="Evaluation tasks (default: offline suite for CPU scales, DataComp's 38 otherwise).")
@click.option("--evalsets", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Evaluation sets folder (default: WORK/evalsets when present, else $CURATE_EVALSETS).")
@click.option("--pretrained", multiple=True, metavar="[ARCH=]WEIGHTS",
              help="Weights for recipe steps that read embeddings (as `curate filter --pretrained`).")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Leaderboard DuckDB file (default $CURATE_LEADERBOARD or ~/.local/share/curate/leaderboard.duckdb).")
@click.option("--name", default=None, help="Leaderboard name (default: the recipe's name).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars (stage lines are still printed).")
def run_cmd(recipe, scale, pool, seeds, work, tasks, evalsets, pretrained, db, name, device, no_progress) -> None:
    """Recipe to leaderboard in one command: filter -> reshard -> train -> evaluate -> submit.

    Every stage is skipped when its outputs are up to date, so re-running resumes where a killed run stopped
    and a finished pipeline does nothing. Ends with the leaderboard for the scale.
    """
    from curate.clip.models import parse_pretrained

    cfg = RunConfig(recipe=recipe, scale=scale, pool=pool, seeds=parse_seeds(seeds), work=work,
                    tasks=list(tasks) or None, evalsets=evalsets, pretrained=parse_pretrained(pretrained), db=db,
                    name=name, device=device, progress=not no_progress)
    out = run_recipe(cfg)
    click.echo("")
    click.echo(out["table"])
