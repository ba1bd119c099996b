"""Build SUBSET and RUN directories in the formats the brief fixes, for submit/leaderboard tests.

    SUBSET/uids.npy, subset.parquet, manifest.json (recipe + hash, counts per step), decisions.parquet
    RUN/info.json (scale, subset path/hash, seed, arch, versions, official flag, hyperparameters),
    RUN/checkpoints/*.pt (a few bytes: submit never loads it), RUN/eval_results.jsonl (one line per task)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa

from curate.core import atomic, uids as uidlib

def official_hparams(scale: str = "debug") -> dict:
    """The scale's fixed hyperparameters, as the trainer records them in info.json."""
    from benchmark.scales import get_scale

    return get_scale(scale).as_dict()


def make_subset(dir: Path, uids: list[str], name: str = "my_recipe") -> Path:
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    uidlib.save(dir / "uids.npy", uids)
    atomic.write_parquet(dir / "subset.parquet", pa.table({"uid": pa.array(sorted(uids), pa.string())}))
    recipe = f"name: {name}\nsteps:\n  - basic: {{min_words: 1}}\n"
    atomic.write_text(dir / "recipe.yaml", recipe)
    atomic.write_json(dir / "manifest.json", {
        "recipe": {"name": name, "steps": [{"basic": {"min_words": 1}}]},
        "recipe_sha256": hashlib.sha256(recipe.encode()).hexdigest(),
        "counts": [{"step": "basic", "in": len(uids) + 3, "kept": len(uids)}],
    })
    atomic.write_parquet(dir / "decisions.parquet", pa.table({
        "uid": pa.array(uids, pa.string()), "step": ["basic"] * len(uids), "kept": [True] * len(uids)}))
    return dir


def make_run(dir: Path, subset: Path, seed: int = 0, scores: dict[str, float | None] | None = None,
             scale: str = "debug", official: bool = True, hparams: dict | None = None) -> Path:
    dir = Path(dir)
    (dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (dir / "checkpoints" / "epoch_final.pt").write_bytes(b"not a real checkpoint")
    scores = scores if scores is not None else {"emoji_category": 0.3, "fashion_mnist": 0.1, "tuxpaint_retrieval": 0.2}
    lines = [
        {"key": k, "dataset": k.replace("_", " "), "main_metric": "acc1",
         "metrics": {} if v is None else {"acc1": v, "acc5": 1.0}, "n": 0 if v is None else 100}
        for k, v in scores.items()
    ]
    atomic.write_text(dir / "eval_results.jsonl", "".join(json.dumps(l) + "\n" for l in lines))
    # the shape benchmark/train.py writes: hyperparameters under run.scale, the data path under "data"
    atomic.write_json(dir / "info.json", {
        "status": "done", "scale": scale, "seed": seed, "model": "curate-debug", "official": official,
        "data": str(subset), "subset_hash": hashlib.sha256((subset / "uids.npy").read_bytes()).hexdigest(),
        "run": {"scale": dict(hparams or official_hparams(scale)), "official": official, "seed": seed},
        "versions": {"torch": "2.14.1"},
    })
    return dir


def random_checkpoint(path: Path, seed: int = 0, arch: str = "curate-debug") -> Path:
    """A randomly initialised open_clip checkpoint of `arch` (seeded), saved as curate saves weights."""
    import torch

    from curate.clip.models import load_model, save_checkpoint

    torch.manual_seed(seed)
    save_checkpoint(load_model(arch, None, "cpu").model, path)
    return path


def checkpoint_run(dir: Path, ckpt: Path, arch: str = "curate-debug") -> Path:
    """A RUN folder holding `ckpt` as final.pt and the info.json fields `curate evaluate` reads."""
    import shutil

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(ckpt, dir / "final.pt")
    (dir / "info.json").write_text(json.dumps({"model": arch, "final_checkpoint": "final.pt", "status": "done"}))
    return dir


def resharded_subset(root: Path, n_shards: int = 2, per_shard: int = 26) -> tuple[Path, Path]:
    """A pool from tests/pool_factory (one corrupt and one failed row per shard) and a SUBSET of all its
    successful uids, resharded into shards of 16: (pool, subset)."""
    from curate.reshard.stage import ReshardConfig, reshard
    from tests.pool_factory import make_pool

    fp = make_pool(Path(root) / "pool", n_shards=n_shards, per_shard=per_shard, corrupt=1, failed=1)
    uidlib.save(Path(root) / "subset" / "uids.npy", fp.success_uids())
    reshard(ReshardConfig(subset=Path(root) / "subset", pool=fp.pool, shard_size=16, workers=1, progress=False))
    return fp.pool, Path(root) / "subset"
