"""`curate demo`: the whole toolkit on the built-in offline pool, from nothing to a leaderboard.

    build the offline pool -> serve it on 127.0.0.1 (background thread) -> download it (img2dataset)
    -> train scorer v2 (`curate train-scorer --variant itm`), which also embeds the pool with its CLIP and writes
       itm_score -> build the offline evaluation suite
    -> for each demo recipe: filter, reshard, train (tiny), evaluate, submit
    -> print the leaderboard (95% intervals, chance levels) and write WORK/leaderboard.html

Every step is a stage function that skips finished work, so re-running the demo after an interruption resumes
where it stopped, and re-running a finished demo only prints the leaderboard again. Per-step timings go to
WORK/demo.json.

The scorer is scorer v2 rather than the contrastive DFN-style CLIP because the latter separates swapped captions
from clean ones with ROC AUC only ~0.72, so its "top 30%" keeps much of the noise (issue 19). Scorer v2 pretrains
the tiny CLIP on the pool, fine-tunes it on the trusted subset, and trains an image-text matching head with hard
negatives; a fixed fifth of the pool is held out of all three, and the demo prints the head's ROC AUC per noise
kind on those rows. The demo's recipes are written to WORK/recipes/ because their steps read this scorer's outputs:
the CLIP-score steps the head's ``itm_score`` folder (model ``<arch>-itm``, weights = the head file) and the dedup
step the bootstrapped CLIP's image embeddings (model ``<arch>``, weights = the checkpoint), passed like
`curate run --pretrained curate-tiny=CKPT --pretrained curate-tiny-itm=HEAD`.
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
# clip_score_b32_30_percent rule, scored here by scorer v2's image-text matching head, trained offline); exact +
# near-duplicate removal by image embedding (FAISS), then the same CLIP-score rule. `curate-tiny` is replaced by
# the scorer's architecture (curate-debug at --scale debug).
DEMO_RECIPES: dict[str, str] = {
    "no_filter": """\
# Every downloaded sample (DataComp baseline "No filtering").
name: no_filter
steps: []
""",
    "clip_itm_30pct": """\
# DataComp's "CLIP score (L/14 30%)" rule (clip_score_b32_30_percent) with an offline scorer: keep the 30% of the
# pool with the highest itm_score of scorer v2 (`curate train-scorer --variant itm`: a tiny CLIP pretrained on the
# pool and fine-tuned on the trusted subset, plus an image-text matching head trained with hard negatives). The
# score is the head's probability that image and caption match (docs/FORMATS.md "Scores"), not a cosine.
name: clip_itm_30pct
steps:
  - score: {model: curate-tiny-itm, column: itm_score, keep_top_fraction: 0.3}
""",
    "dedup_clip_itm_30pct": """\
# Remove exact (sha256) and near duplicates (image-embedding cosine >= 0.99 in scorer v2's CLIP, FAISS), then keep
# the top 30% of the remainder by scorer v2's itm_score (DataComp's CLIP-score 30% rule). The threshold is stricter
# than DataComp-style 0.95 because the groups are transitive and a small scorer's image embeddings are crowded.
# "on" is quoted: YAML 1.1 reads a bare `on` as true.
name: dedup_clip_itm_30pct
steps:
  - dedup: {"on": image, threshold: 0.99, model: curate-tiny}
  - score: {model: curate-tiny-itm, column: itm_score, keep_top_fraction: 0.3}
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
    workers: int = 2  # data-loader workers of every training run (scorer stages and recipes)
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
    """Run the demo; return {stages, table, html, db, scorer, ...} (also written to WORK/demo.json)."""
    from benchmark.evalsets import BuildOfflineConfig, build_offline as build_evalsets
    from benchmark.leaderboard import format_standings, standings, write_html
    from curate.pool.download import DownloadConfig, download
    from curate.pool.offline.build import OfflinePoolConfig, build_offline
    from curate.run.pipeline import RunConfig, StageLog, run_recipe
    from curate.run.scorer import ScorerConfig, train_scorer

    w = cfg.work
    w.mkdir(parents=True, exist_ok=True)
    build, pool, scorer = w / "pool_build", w / "pool", w / "scorer_itm.pt"
    evalsets, db = w / "evalsets", w / "leaderboard.duckdb"
    t_start = time.perf_counter()
    log = StageLog(total=4 + len(cfg.recipes) * (2 + 3 * len(cfg.seeds)))
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
    # scorer v2; train_scorer embeds the pool with the bootstrapped CLIP (skipped when up to date) and writes
    # itm_score, so no separate embed stage is needed
    sc = log.run(f"train-scorer v2 ({cfg.scale}, --variant itm: pretrain on the pool, fine-tune on the trusted "
                 "subset, ITM head; embeds the pool)",
                 lambda: train_scorer(ScorerConfig(pool=pool, out=scorer, truth=build / "truth.parquet",
                                                   scale=cfg.scale, device=cfg.device, workers=cfg.workers,
                                                   progress=cfg.progress, variant="itm")),
                 lambda s: f"{s['trusted_rows']} trusted pairs -> {s['out']} + {Path(s['itm_head']).name}; "
                           f"embeddings {s['model_id']}, itm_score in {s['scores_model_id']}")
    arch = sc["arch"]
    check = scorer_check(sc)
    for line in check["lines"]:
        click.echo(f"      {line}")
    log.run("build offline evaluation suite",
            lambda: _evalsets(build_evalsets(BuildOfflineConfig(out=evalsets, pool_dir=build))),
            lambda s: ", ".join(f"{k.split('/')[-1]} {v.get('n')}" for k, v in s.items()
                                if isinstance(v, dict) and v.get("n") is not None))  # suite v2 needs a large pool
    rdir = w / "recipes"
    # the dedup step reads the bootstrapped CLIP's embeddings, the score step the ITM head's itm_score folder
    pretrained = {arch: str(scorer), f"{arch}-itm": str(sc["itm_head"])}
    failed: dict[str, str] = {}
    for name in cfg.recipes:
        path = rdir / f"{name}.yaml"
        text = DEMO_RECIPES[name].replace("model: curate-tiny", f"model: {arch}")  # the scorer's architecture
        if not path.is_file() or path.read_text() != text:
            atomic.write_text(path, text)
        try:
            run_recipe(RunConfig(recipe=path, scale=cfg.scale, pool=pool, seeds=cfg.seeds, work=w, tasks=["offline"],
                                 evalsets=evalsets, pretrained=pretrained, db=db, device=cfg.device,
                                 train_workers=cfg.workers, progress=cfg.progress), log)
        except CurateError as e:
            # one recipe that cannot run (e.g. it kept no sample) must not hide the others' results
            failed[name] = e.message
            click.echo(f"      recipe {name} did not complete: {e.message}", err=True)
    rows = standings(db, cfg.scale)
    html = write_html(db, w / "leaderboard.html", cfg.scale)
    cmp_text = compare_verdict(db, [r.name for r in rows], cfg.scale)
    seconds = round(time.perf_counter() - t_start, 1)
    summary = {"stages": log.records, "seconds": seconds, "scorer": {**scorer_record(sc), "check": check["auc"]},
               "failed_recipes": failed, "table": format_standings(rows) + "\n" + chance_text(db, cfg.scale),
               "compare": cmp_text, "html": str(html), "db": str(db), "scale": cfg.scale, "seeds": cfg.seeds,
               "size": cfg.size}
    atomic.write_json(w / "demo.json", summary)
    return summary


def scorer_check(sc: dict) -> dict:
    """What the demo prints about scorer v2: itm_score's held-out ROC AUC on caption swaps first (the noise the
    CLIP-score rule is for), then train-scorer's whole table (itm_score and the bootstrapped CLIP's cosine
    clip_score, every recorded noise kind, each beside a random score's AUC). {"lines", "auc"}; auc is the
    caption-swap entry of itm_score (None when the held-out rows hold no clean or no swapped pair)."""
    from curate.run.scorer import format_report

    rep = sc["report"]
    swap = rep["columns"]["itm_score"]["kinds"].get("caption_swap")
    if swap and swap.get("auc") is not None:
        head = (f"scorer v2 check: itm_score separates clean pairs from swapped captions with ROC AUC "
                f"{swap['auc']:.3f} on held-out rows (random score {swap['random_auc']:.3f}; {swap['n_clean']} clean, "
                f"{swap['n_noisy']} swapped; 0.5 = chance)")
    else:
        swap = None
        head = "scorer v2 check: no held-out clean/swapped rows to compare"
    return {"lines": [head, *format_report(rep).splitlines()], "auc": swap}


def scorer_record(sc: dict) -> dict:
    """demo.json's `scorer`: which scorer (variant, files, embeddings and scores folders) and its held-out AUCs
    per score column and noise kind (train-scorer's report), plus its stage timings."""
    stages = sc.get("stages") or {}
    return {
        "variant": sc.get("variant"), "arch": sc.get("arch"), "out": sc.get("out"), "itm_head": sc.get("itm_head"),
        "model_id": sc.get("model_id"), "scores_model_id": sc.get("scores_model_id"), "score_step": sc.get("score_step"),
        "trusted_rows": sc.get("trusted_rows"), "heldout": sc.get("heldout"), "report": sc.get("report"),
        "summary": sc.get("summary"), "up_to_date": sc.get("up_to_date"),
        "seconds": {"pretrain": (stages.get("pretrain") or {}).get("train_seconds"),
                    "finetune": (stages.get("finetune") or {}).get("train_seconds"),
                    "reshard": sum((stages.get(k) or {}).get("reshard_seconds") or 0 for k in ("pretrain", "finetune")),
                    "embed": sc.get("embed_seconds"), "itm_head": (sc.get("itm") or {}).get("seconds"),
                    "total": sc.get("seconds")},
    }


def chance_text(db: Path, scale: str) -> str:
    """One line under the printed leaderboard: each task's chance level (main metric, as recorded with the results)
    and the chance level of the average, so a score and its interval can be read against chance."""
    from benchmark.leaderboard import connect

    con = connect(db, read_only=True)
    try:
        rows = con.execute("SELECT key, max(chance) FROM results WHERE scale = ? GROUP BY key ORDER BY key",
                           [scale]).fetchall()
    finally:
        con.close()
    if not rows:
        return "chance level: no results"
    known = [(k.split("/")[-1], c) for k, c in rows if c is not None]
    unknown = [k.split("/")[-1] for k, c in rows if c is None]
    per_task = ", ".join(f"{k} {c:.4f}" for k, c in known)
    if unknown:
        avg = f"unknown (no chance level for {', '.join(unknown)})"
    else:
        avg = f"{sum(c for _, c in known) / len(known):.4f}"
    return f"chance level (main metric): {per_task or '-'}; of the average over the {len(rows)} tasks: {avg}"


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
    """The suite's stage summary: up to date when every task it could build was already built ("missing" tasks,
    e.g. suite v2's without a large pool, cannot be built here and must not make a re-run look like new work)."""
    tasks = {k: v for k, v in summary.items() if isinstance(v, dict) and v.get("status") != "missing"}
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
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0),
              help="Data-loader worker processes of each training run (scorer stages and recipes).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars (stage lines are still printed).")
def demo_cmd(work, size, seeds, scale, recipes, port, distributor, device, workers, no_progress) -> None:
    """Run the whole toolkit on the built-in offline pool and print the leaderboard.

    Builds and serves the offline pool, downloads it, trains scorer v2 (`curate train-scorer --variant itm`:
    a tiny CLIP pretrained on the pool and fine-tuned on its trusted subset, plus an image-text matching head)
    and prints its held-out ROC AUC per noise kind, then filters (top 30% by itm_score), trains (scale tiny) and
    evaluates the demo recipes (no_filter, CLIP score 30%, dedup + CLIP score 30%) on the offline suite, and
    prints the leaderboard with 95% intervals and chance levels. Resumable: re-running skips finished steps.
    """
    from curate.run.pipeline import parse_seeds

    s = demo(DemoConfig(work=work, size=size, scale=scale, seeds=parse_seeds(seeds), recipes=list(recipes) or list(DEMO_RECIPES),
                        port=port, distributor=distributor, device=device, workers=workers,
                        progress=not no_progress))
    click.echo("")
    click.echo(s["table"])
    if s["compare"]:
        click.echo("")
        click.echo(s["compare"])
    click.echo(f"\nleaderboard page: {s['html']}   database: {s['db']}   total {s['seconds']:.0f} s")
