"""`curate demo`: the whole toolkit on the built-in offline pool, from nothing to a leaderboard.

    build the offline pool -> serve it on 127.0.0.1 (background thread) -> download it (img2dataset)
    -> train a filtering network on its trusted subset -> embed the pool with it
    -> build the offline evaluation suite -> for each demo recipe: filter, reshard, train (tiny), evaluate, submit
    -> print the leaderboard and write WORK/leaderboard.html

Every step is a stage function that skips finished work, so re-running the demo after an interruption resumes
where it stopped, and re-running a finished demo only prints the leaderboard again. Per-step timings go to
WORK/demo.json.

The demo's recipes are written to WORK/recipes/ because their CLIP-score steps read the embeddings of the scorer
trained here (architecture curate-tiny; the weights are passed like `curate run --pretrained curate-tiny=PATH`).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from curate.core import atomic
from curate.core.errors import CurateError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

DEFAULT_PORT = 8642

# name -> recipe text. DataComp's baselines at CPU size: no filtering; CLIP score top 30% (their
# clip_score_b32_30_percent rule, scored here by the offline filtering network); exact + near-duplicate removal
# by image embedding (FAISS), then the same CLIP-score rule.
DEMO_RECIPES: dict[str, str] = {
    "no_filter": """\
# Every downloaded sample (DataComp baseline "No filtering").
name: no_filter
steps: []
""",
    "clip_tiny_30pct": """\
# Keep the 30% of the pool with the highest image-text cosine of the filtering network trained by
# `curate train-scorer` (DataComp's CLIP-score 30% rule with an offline scorer).
name: clip_tiny_30pct
steps:
  - clip_score: {model: curate-tiny, keep_top_fraction: 0.3}
""",
    "dedup_clip_tiny_30pct": """\
# Remove exact (sha256) and near duplicates (image-embedding cosine >= 0.99, FAISS), then keep the top 30% of
# the remainder by CLIP score. The threshold is stricter than DataComp-style 0.95 because the groups are
# transitive and a small scorer's image embeddings are crowded. "on" is quoted: YAML 1.1 reads a bare `on` as true.
name: dedup_clip_tiny_30pct
steps:
  - dedup: {"on": image, threshold: 0.99, model: curate-tiny}
  - clip_score: {model: curate-tiny, keep_top_fraction: 0.3}
""",
}


@dataclass
class DemoConfig:
    """Inputs of `demo`."""

    work: Path = Path("work")
    size: str = "full"  # offline pool size: full (~12k rows) or small (~1.5k, for a quick look)
    scale: str = "tiny"
    seeds: list[int] = field(default_factory=lambda: [0])
    recipes: list[str] = field(default_factory=lambda: list(DEMO_RECIPES))
    port: int = DEFAULT_PORT
    image_size: int = 128  # download resize target; the tiny CLIP trains at 64 px
    distributor: str = "ray"
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        self.work = Path(self.work).absolute()
        unknown = [r for r in self.recipes if r not in DEMO_RECIPES]
        if unknown:
            raise CurateError(f"--recipe {', '.join(unknown)}: unknown demo recipe; choose from {', '.join(DEMO_RECIPES)}")


@contextlib.contextmanager
def _serving(build: Path, port: int, needed: bool):
    """Serve the pool build while downloading; when the pool is already complete no server is needed."""
    if not needed:
        yield None
        return
    from curate.pool.serve import running_server

    with running_server(build, port=port) as url:
        yield url


def _pool_complete(pool: Path) -> bool:
    import json

    try:
        return json.loads((pool / "pool.json").read_text()).get("state") == "complete"
    except (OSError, ValueError):
        return False


def demo(cfg: DemoConfig) -> dict:
    """Run the demo; return {stages, table, html, db}."""
    from benchmark.evalsets import BuildOfflineConfig, build_offline as build_evalsets
    from benchmark.leaderboard import format_standings, standings, write_html
    from curate.pool.download import DownloadConfig, download
    from curate.embed.stage import EmbedConfig, embed
    from curate.pool.offline.build import OfflinePoolConfig, build_offline
    from curate.run.pipeline import RunConfig, StageLog, run_recipe
    from curate.run.scorer import ScorerConfig, caption_swap_auc, train_scorer

    w = cfg.work
    w.mkdir(parents=True, exist_ok=True)
    build, pool, scorer = w / "pool_build", w / "pool", w / "scorer.pt"
    evalsets, db = w / "evalsets", w / "leaderboard.duckdb"
    t_start = time.perf_counter()
    log = StageLog(total=5 + len(cfg.recipes) * (2 + 3 * len(cfg.seeds)))
    log.run(f"build offline pool ({cfg.size})",
            lambda: build_offline(OfflinePoolConfig(out=build, size=cfg.size, seed=0,
                                                    base_url=f"http://127.0.0.1:{cfg.port}", progress=cfg.progress)),
            lambda s: f"{s.get('rows')} rows")
    with _serving(build, cfg.port, needed=not _pool_complete(pool)):
        log.run("download (img2dataset, served on 127.0.0.1)",
                lambda: download(DownloadConfig(urls=build / "urls.parquet", out=pool, image_size=cfg.image_size,
                                                distributor=cfg.distributor, progress=cfg.progress, echo=False,
                                                allow_loopback=True)),  # the pool is served on 127.0.0.1
                lambda s: ", ".join(f"{k} {v}" for k, v in (s.get("counts") or {}).items()))
    sc = log.run(f"train-scorer ({cfg.scale}, trusted subset)",
                 lambda: train_scorer(ScorerConfig(pool=pool, out=scorer, scale=cfg.scale, device=cfg.device,
                                                   progress=cfg.progress)),
                 lambda s: f"{s['trusted_rows']} trusted pairs -> {s['out']}")
    arch = sc["arch"]
    embedded = log.run(f"embed pool with the scorer ({arch})",
                       lambda: embed(EmbedConfig(pool=pool, model=arch, pretrained=str(scorer), device=cfg.device,
                                                 progress=cfg.progress)),
                       lambda s: f"{s.get('model_id')}")
    auc = caption_swap_auc(pool, embedded["model_id"], Path(sc["truth"]))
    click.echo(f"      scorer check: CLIP score separates clean pairs from swapped captions with ROC AUC "
               f"{auc['auc']:.3f} ({auc['n_clean']} clean, {auc['n_swapped']} swapped; 0.5 = chance)"
               if auc["auc"] is not None else "      scorer check: no clean/swapped rows to compare")
    log.run("build offline evaluation suite",
            lambda: _evalsets(build_evalsets(BuildOfflineConfig(out=evalsets, pool_dir=build))),
            lambda s: ", ".join(f"{k.split('/')[-1]} {v.get('n')}" for k, v in s.items()
                                if isinstance(v, dict) and v.get("n") is not None))  # suite v2 needs a large pool
    rdir = w / "recipes"
    failed: dict[str, str] = {}
    for name in cfg.recipes:
        path = rdir / f"{name}.yaml"
        text = DEMO_RECIPES[name].replace("model: curate-tiny", f"model: {arch}")  # the scorer's architecture
        if not path.is_file() or path.read_text() != text:
            atomic.write_text(path, text)
        try:
            run_recipe(RunConfig(recipe=path, scale=cfg.scale, pool=pool, seeds=cfg.seeds, work=w, tasks=["offline"],
                                 evalsets=evalsets, pretrained={arch: str(scorer)}, db=db, device=cfg.device,
                                 progress=cfg.progress), log)
        except CurateError as e:
            # one recipe that cannot run (e.g. it kept no sample) must not hide the others' results
            failed[name] = e.message
            click.echo(f"      recipe {name} did not complete: {e.message}", err=True)
    rows = standings(db, cfg.scale)
    html = write_html(db, w / "leaderboard.html", cfg.scale)
    cmp_text = compare_verdict(db, [r.name for r in rows], cfg.scale)
    seconds = round(time.perf_counter() - t_start, 1)
    summary = {"stages": log.records, "seconds": seconds, "scorer_caption_swap_auc": auc, "failed_recipes": failed,
               "table": format_standings(rows), "compare": cmp_text,
               "html": str(html), "db": str(db), "scale": cfg.scale, "seeds": cfg.seeds, "size": cfg.size}
    atomic.write_json(w / "demo.json", summary)
    return summary


def compare_verdict(db: Path, names: list[str], scale: str) -> str:
    """`curate compare no_filter BEST`'s report (intervals, p-values, verdict) for the best-ranked other recipe;
    "" when there is nothing to compare. With one seed per recipe it says that seed variance is unknown."""
    from benchmark import compare as C
    from benchmark.leaderboard import db_side

    # a leaderboard label joins the names of one recipe hash ("a / b"); each name is a submission
    names = [n.split(" / ")[0] for n in names]
    if "no_filter" not in names or len(names) < 2:
        return ""
    best = next(n for n in names if n != "no_filter")
    return C.format_report(C.compare(db_side(db, "no_filter", scale), [db_side(db, best, scale)])[0])


def _evalsets(summary: dict) -> dict:
    tasks = {k: v for k, v in summary.items() if isinstance(v, dict)}
    return {**summary, "up_to_date": bool(tasks) and all(v.get("status") == "up_to_date" for v in tasks.values())}


@click.command("demo")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("work"), show_default=True,
              help="Folder for everything the demo makes (pool, scorer, subsets, runs, leaderboard).")
@click.option("--size", type=click.Choice(["full", "small"]), default="full", show_default=True,
              help="Offline pool size: full (~12k rows) or small (~1.5k rows, a quicker look).")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated training seeds per recipe.")
@click.option("--scale", default="tiny", show_default=True,
              help="Training scale for the scorer and the recipes (`debug` is a seconds-long smoke run).")
@click.option("--recipe", "recipes", multiple=True, type=click.Choice(list(DEMO_RECIPES)),
              help="Run only these demo recipes (repeatable; default all three).")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int,
              help="Loopback port the pool is served on during the download (part of the pool's URLs).")
@click.option("--distributor", type=click.Choice(["ray", "multiprocessing"]), default="ray", show_default=True,
              help="How the download spreads shards over processes.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars (stage lines are still printed).")
def demo_cmd(work, size, seeds, scale, recipes, port, distributor, device, no_progress) -> None:
    """Run the whole toolkit on the built-in offline pool and print the leaderboard.

    Builds and serves the offline pool, downloads it, trains a filtering network on its trusted subset, embeds
    the pool with it, then filters, trains (scale tiny) and evaluates the demo recipes (no_filter, CLIP score
    30%, dedup + CLIP score 30%) on the offline suite. Resumable: re-running skips finished steps.
    """
    from curate.run.pipeline import parse_seeds

    s = demo(DemoConfig(work=work, size=size, scale=scale, seeds=parse_seeds(seeds), recipes=list(recipes) or list(DEMO_RECIPES),
                        port=port, distributor=distributor, device=device, progress=not no_progress))
    click.echo("")
    click.echo(s["table"])
    if s["compare"]:
        click.echo("")
        click.echo(s["compare"])
    click.echo(f"\nleaderboard page: {s['html']}   database: {s['db']}   total {s['seconds']:.0f} s")
