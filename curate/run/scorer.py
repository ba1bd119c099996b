"""`curate train-scorer`: a CLIP scoring model trained here, without internet (Data Filtering Networks style).

No package ships pretrained CLIP weights and nothing may be downloaded from a hub, so CLIP-score filtering needs
a scoring model trained locally. Following Data Filtering Networks (Fang et al. 2023), the filtering network is a
CLIP trained on a small *trusted* subset of high-quality pairs; its image-text cosine then scores the whole pool.
For the offline pool the trusted subset is the rows whose source has clean human captions (Tux Paint stamps and
Twemoji names) and whose ground-truth noise kind is ``none`` (truth.parquet of `curate pool build-offline`).

It reuses the project's own stages: the trusted uids become a SUBSET, `curate reshard` writes its shards, and
`curate train` trains it at a fixed scale (``tiny`` by default). The final weights are copied to --out as an
open_clip checkpoint, usable as ``curate embed --model curate-tiny --pretrained OUT``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import click

from curate.core import atomic
from curate.core.errors import CurateError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

TRUSTED_SOURCES = ("tuxpaint", "twemoji")


@dataclass
class ScorerConfig:
    """Inputs of `train_scorer`."""

    pool: Path  # a downloaded POOL (metadata/*.parquet, shards/)
    out: Path  # checkpoint file to write
    truth: Path | None = None  # default: truth.parquet next to the urls file the pool was downloaded from
    sources: tuple[str, ...] = TRUSTED_SOURCES
    scale: str = "tiny"
    seed: int = 0
    work: Path | None = None  # default: <out without suffix>.work/
    device: str = "auto"
    workers: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        self.pool, self.out = Path(self.pool), Path(self.out)
        self.work = Path(self.work) if self.work else self.out.with_name(self.out.stem + ".work")


def find_truth(pool: Path) -> Path:
    """truth.parquet of the offline build the pool was downloaded from (POOL/pool.json records the input path)."""
    pj = pool / "pool.json"
    if pj.is_file():
        try:
            src = json.loads(pj.read_text()).get("input", {}).get("path")
        except (ValueError, AttributeError):
            src = None
        if src:
            cand = Path(src).parent / "truth.parquet"
            if cand.is_file():
                return cand
    raise CurateError(f"{pool}: cannot find the pool's truth.parquet (pool.json names no offline build next to its "
                      "urls file); pass --truth BUILD/truth.parquet")


def trusted_uids(pool: Path, truth: Path, sources: tuple[str, ...]) -> tuple[list[str], dict]:
    """uids of successfully downloaded pool rows from trusted sources with no injected noise; plus counts."""
    import duckdb

    meta = pool / "metadata"
    if not meta.is_dir() or not any(meta.glob("*.parquet")):
        raise CurateError(f"{pool}: not a pool (no metadata/*.parquet); run `curate download` first")
    if not truth.is_file():
        raise CurateError(f"--truth {truth}: no such file")
    con = duckdb.connect()
    q = lambda p: "'" + str(p).replace("'", "''") + "'"  # noqa: E731
    cols = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet({q(truth)})").fetchall()}
    for c in ("uid", "source", "noise"):
        if c not in cols:
            raise CurateError(f"{truth}: missing column {c!r} (expected the truth.parquet of `curate pool build-offline`)")
    src_list = ", ".join(q(s) for s in sources)
    rows = con.execute(
        f"""SELECT DISTINCT t.uid FROM read_parquet({q(truth)}) t
            JOIN read_parquet({q(meta / '*.parquet')}, union_by_name=true) m ON m.uid = t.uid
            WHERE t.source IN ({src_list}) AND t.noise = 'none' AND m.status = 'success' ORDER BY t.uid"""
    ).fetchall()
    by_source = dict(con.execute(
        f"SELECT source, count(*) FROM read_parquet({q(truth)}) WHERE source IN ({src_list}) AND noise = 'none' "
        "GROUP BY source ORDER BY source").fetchall())
    con.close()
    uids = [r[0] for r in rows]
    return uids, {"trusted_in_truth": by_source, "trusted_downloaded": len(uids)}


def _write_subset(subset: Path, uids: list[str], pool: Path, truth: Path, sources: tuple[str, ...], counts: dict) -> None:
    """SUBSET/uids.npy + manifest.json, rewritten only when the uid list changed (keeps reshard up to date)."""
    from curate.core import uids as uidlib

    arr = uidlib.encode(uids)
    digest = hashlib.sha256(arr.tobytes()).hexdigest()
    man_p = subset / "manifest.json"
    if man_p.is_file() and (subset / "uids.npy").is_file():
        try:
            if json.loads(man_p.read_text()).get("uids_digest") == digest:
                return
        except ValueError:
            pass
    uidlib.save(subset / "uids.npy", arr)
    atomic.write_json(man_p, {
        "recipe": {"name": "scorer_trusted_subset", "rule": f"truth.source in {list(sources)} and truth.noise == 'none'"
                   " and pool status == success"},
        "pool": str(pool.resolve()), "truth": str(truth.resolve()), "uids_digest": digest,
        "counts": {"subset": len(uids), **counts},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })


def train_scorer(cfg: ScorerConfig) -> dict:
    """Train the filtering network and write cfg.out; return a summary (up_to_date when nothing changed)."""
    from benchmark.train import TrainConfig, train
    from curate.reshard.stage import ReshardConfig, reshard

    truth = Path(cfg.truth) if cfg.truth else find_truth(cfg.pool)
    uids, counts = trusted_uids(cfg.pool, truth, cfg.sources)
    if len(uids) < 64:
        raise CurateError(f"{truth}: only {len(uids)} trusted rows ({', '.join(cfg.sources)}, noise none, downloaded) "
                          "in the pool; too few to train a scoring model")
    subset = cfg.work / "trusted"
    _write_subset(subset, uids, cfg.pool, truth, cfg.sources, counts)
    rs = reshard(ReshardConfig(subset=subset, pool=cfg.pool, progress=cfg.progress))
    run = cfg.work / f"run-{cfg.scale}-seed{cfg.seed}"
    from benchmark.train import stale_run

    if stale_run(run, subset):
        import shutil

        shutil.rmtree(run)
    info = train(TrainConfig(data=subset, scale=cfg.scale, out=run, seed=cfg.seed, device=cfg.device, resume=True,
                             workers=cfg.workers, progress=cfg.progress))
    final = run / info.get("final_checkpoint", "final.pt")
    data = final.read_bytes()
    up_to_date = cfg.out.is_file() and hashlib.sha256(cfg.out.read_bytes()).digest() == hashlib.sha256(data).digest()
    if not up_to_date:
        atomic.write_bytes(cfg.out, data)
    return {
        "out": str(cfg.out), "arch": info.get("model"), "scale": cfg.scale, "seed": cfg.seed, "truth": str(truth),
        "trusted_rows": len(uids), "resharded": rs.get("n_written"), **counts, "run": str(run),
        "steps": info.get("steps"), "up_to_date": bool(up_to_date and info.get("up_to_date")),
        "embed_command": f"curate embed --pool {cfg.pool} --model {info.get('model')} --pretrained {cfg.out}",
    }


def caption_swap_auc(pool: Path, model_id: str, truth: Path) -> dict:
    """How well the scorer's CLIP score separates clean pairs from swapped captions (ROC AUC, Mann-Whitney).

    Uses the pool's embeddings for `model_id` and truth.parquet's noise kinds: positives are rows with noise
    ``none``, negatives rows with ``caption_swap``. 0.5 is chance; this is the quality the CLIP-score filter gets.
    """
    import duckdb
    import numpy as np

    emb = Path(pool) / "embeddings" / model_id
    if not any(emb.glob("*.parquet")):
        raise CurateError(f"{emb}: no embeddings; run `curate embed` with this model first")
    q = lambda p: "'" + str(p).replace("'", "''") + "'"  # noqa: E731
    con = duckdb.connect()
    rows = con.execute(
        f"""SELECT t.noise = 'none' AS clean, e.clip_score FROM read_parquet({q(emb / '*.parquet')}) e
            JOIN read_parquet({q(truth)}) t USING (uid)
            WHERE t.noise IN ('none', 'caption_swap') AND e.clip_score IS NOT NULL AND NOT isnan(e.clip_score)"""
    ).fetchall()
    con.close()
    clean = np.array([r[0] for r in rows], dtype=bool)
    score = np.array([r[1] for r in rows], dtype=np.float64)
    n_pos, n_neg = int(clean.sum()), int((~clean).sum())
    if not n_pos or not n_neg:
        return {"auc": None, "n_clean": n_pos, "n_swapped": n_neg}
    order = score.argsort(kind="stable")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    # average ranks of ties, so equal scores count one half
    _, inv, counts = np.unique(score, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = sums[inv] / counts[inv]
    auc = (ranks[clean].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return {"auc": float(auc), "n_clean": n_pos, "n_swapped": n_neg}


@click.command("train-scorer")
@click.option("--pool", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Downloaded POOL to take the trusted samples from.")
@click.option("--truth", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Ground-truth sidecar (default: truth.parquet next to the urls file the pool was downloaded from).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Checkpoint file to write (an open_clip checkpoint).")
@click.option("--source", "sources", multiple=True, default=TRUSTED_SOURCES, show_default=True,
              help="Trusted sources (truth.parquet `source`), rows with noise 'none' only.")
@click.option("--scale", default="tiny", show_default=True, help="Training scale (benchmark/scales.py).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True)
@click.option("--no-progress", is_flag=True)
def train_scorer_cmd(pool, truth, out, sources, scale, seed, device, no_progress) -> None:
    """Train a CLIP filtering network on the pool's trusted subset (Data Filtering Networks, offline).

    The trusted subset is the rows of clean-caption sources (Tux Paint, Twemoji) with no injected noise. Uses the
    project's reshard and trainer at a fixed scale; re-running with unchanged inputs does nothing. Score a pool
    with it: `curate embed --pool POOL --model curate-tiny --pretrained OUT`.
    """
    s = train_scorer(ScorerConfig(pool=pool, out=out, truth=truth, sources=tuple(sources), scale=scale, seed=seed,
                                  device=device, progress=not no_progress))
    state = "already up to date" if s["up_to_date"] else "written"
    click.echo(f"{s['out']} ({state}): {s['arch']} trained at scale {scale} on {s['trusted_rows']} trusted pairs "
               f"({s['trusted_in_truth']})")
    click.echo(f"next: {s['embed_command']}")
