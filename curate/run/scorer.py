"""`curate train-scorer`: a CLIP scoring model trained here, without internet (Data Filtering Networks style).

No package ships pretrained CLIP weights and nothing may be downloaded from a hub, so CLIP-score filtering needs
a scoring model trained locally. Following Data Filtering Networks (Fang et al. 2023), the filtering network is a
CLIP trained on a small *trusted* subset of high-quality pairs; its image-text cosine then scores the whole pool.
For the offline pool the trusted subset is the rows whose source has clean human captions (Tux Paint stamps and
Twemoji names) and whose ground-truth noise kind is ``none`` (truth.parquet of `curate pool build-offline`).

It reuses the project's own stages: the trusted uids become a SUBSET, `curate reshard` writes its shards, and
`curate train` trains it at a fixed scale (``tiny`` by default). The final weights are copied to --out as an
open_clip checkpoint, usable as ``curate embed --model curate-tiny --pretrained OUT``.

Variants (``--variant``):

- ``contrastive`` (default): the DFN-style CLIP above, trained on every trusted row.
- ``bootstrap`` (BLIP's CapFilt bootstrapping, DFN's "train the filter on high-quality data"): stage 1 pretrains
  the tiny CLIP on every downloaded pool row (noisy), stage 2 fine-tunes that checkpoint on the trusted subset
  (`benchmark.train.TrainConfig.init_checkpoint`). Both stages are unofficial runs of the scale with their own
  samples seen (`pretrain_samples`, `finetune_samples`: 5/7 and 2/7 of the scale's, i.e. 64,000 + 25,600 at
  ``tiny``, the tiny scale's 89,600 in all: ~7.5 minutes at ~200 samples/s on 2 idle cores).
- ``itm``: bootstrap, then an image-text matching head trained with hard negatives on the frozen embeddings of
  the bootstrapped encoder, plus neighbourhood-agreement features computed on the pool's non-held-out rows
  (curate/run/itm.py says how and how it differs from BLIP's fusion-encoder ITM). It writes ``itm_score`` for
  every pool row under POOL/embeddings/<arch>-itm__<hash>/ (docs/FORMATS.md "Scores"), which the ``score``
  filter selects by name. Beside it, ``match_score`` of the *pool matcher* (curate/run/matcher.py): a matcher
  trained on the non-held-out pool rows that reads the frozen CLIP vectors plus image thumbnails and hashed
  caption tokens, which the tiny CLIP cannot spare capacity for (held-out caption-swap AUC 0.92 on the large
  pool, against 0.76 for itm_score; perf/RESULTS.md). ``--no-matcher`` leaves it out. `curate demo` trains
  this variant.

**Held-out rows.** ``bootstrap`` and ``itm`` leave a fixed, uid-defined fifth of the pool out of every training
stage (`HELDOUT_RULE`: ``int(sha256(uid)[:16], 16) % 5 == 0``), so the report's ROC AUCs are measured on pool rows
no stage saw. ``contrastive`` keeps its old behaviour (every trusted row; earlier results stay reproducible) and
its report says that its held-out rows were not held out of training.

**Trusted subset.** By default (the small / full pools) the rows of `--source` sources with truth.parquet noise
``none``. For the large pool the subset is defined by source, never by truth.parquet (its seeded noise stays in):
``--trusted POOL_BUILD/trusted.parquet`` takes the uids of that file (docs/LARGE_POOL.md).

**Report** (`report`, on by default for bootstrap / itm): the pool is embedded with the scorer (`curate embed`,
skipped when up to date), and for every score column the ROC AUC of clean rows (noise ``none``) against each
recorded noise kind, on held-out rows only, with a random-score baseline (`score_auc`). It is printed and written
with the rest of the summary to ``<out stem>.summary.json`` beside the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from curate.core import atomic
from curate.core.errors import CurateError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

TRUSTED_SOURCES = ("tuxpaint", "twemoji")
VARIANTS = ("contrastive", "bootstrap", "itm")
HELDOUT_MODULUS = 5
HELDOUT_RULE = "int(sha256(uid.encode()).hexdigest()[:16], 16) % 5 == 0 (20% of the uids)"
RANDOM_BASELINE_SEED = 0


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
    variant: str = "contrastive"
    trusted: Path | None = None  # a parquet with a `uid` column (POOL_BUILD/trusted.parquet); default: sources rule
    pretrain_samples: int | None = None  # bootstrap stage 1; default 5/7 of the scale's samples seen
    finetune_samples: int | None = None  # bootstrap stage 2; default 2/7 of the scale's samples seen
    finetune_lr: float | None = None  # default half the scale's lr (fine-tuning a pretrained model)
    report: bool | None = None  # embed the pool and measure the AUCs; default: on for bootstrap / itm
    itm: object | None = None  # a curate.run.itm.ItmConfig; default ItmConfig(seed=seed)
    match: bool = True  # itm variant: also train the pool matcher and write match_score (curate/run/matcher.py)
    matcher: object | None = None  # a curate.run.matcher.MatcherConfig; default MatcherConfig(seed=seed)
    embed_batch: int = 256

    def __post_init__(self) -> None:
        self.pool, self.out = Path(self.pool), Path(self.out)
        self.work = Path(self.work) if self.work else self.out.with_name(self.out.stem + ".work")
        self.trusted = Path(self.trusted) if self.trusted else None
        if self.variant not in VARIANTS:
            raise CurateError(f"--variant {self.variant!r}: choose one of {', '.join(VARIANTS)}")
        if self.report is None:
            self.report = self.variant != "contrastive"
        if self.variant == "itm":
            self.report = True  # the head scores the pool from its embeddings: they are computed anyway

    @property
    def summary_path(self) -> Path:
        return self.out.with_name(self.out.stem + ".summary.json")

    @property
    def head_path(self) -> Path:
        return self.out.with_name(self.out.stem + ".itm.pt")

    @property
    def matcher_path(self) -> Path:
        return self.out.with_name(self.out.stem + ".matcher.pt")


def uid_fold(uids) -> "np.ndarray":  # noqa: F821
    """Fold per uid, 0..4: ``int(sha256(uid)[:16], 16) % 5``; fold 0 is the held-out fifth (`HELDOUT_RULE`)."""
    import numpy as np

    return np.fromiter((int(hashlib.sha256(u.encode()).hexdigest()[:16], 16) % HELDOUT_MODULUS for u in uids),
                       dtype=np.int64, count=len(uids))


def is_heldout(uids) -> "np.ndarray":  # noqa: F821
    """Bool per uid: True for the held-out fifth (`HELDOUT_RULE`), the same on every machine and run."""
    return uid_fold(uids) == 0


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


def _q(p) -> str:
    return "'" + str(p).replace("'", "''") + "'"


def success_uids(pool: Path) -> list[str]:
    """uids of the pool's downloaded rows, sorted."""
    import duckdb

    meta = pool / "metadata"
    if not meta.is_dir() or not any(meta.glob("*.parquet")):
        raise CurateError(f"{pool}: not a pool (no metadata/*.parquet); run `curate download` first")
    con = duckdb.connect()
    rows = con.execute(f"SELECT DISTINCT uid FROM read_parquet({_q(meta / '*.parquet')}, union_by_name=true) "
                       "WHERE status = 'success' ORDER BY uid").fetchall()
    con.close()
    return [r[0] for r in rows]


def trusted_uids_from_file(pool: Path, trusted: Path) -> tuple[list[str], dict]:
    """uids of downloaded pool rows listed in `trusted` (a parquet with a `uid` column, e.g. trusted.parquet of
    the large offline build: defined by source, noise included); plus counts."""
    import pyarrow.parquet as pq

    if not trusted.is_file():
        raise CurateError(f"--trusted {trusted}: no such file")
    try:
        names = pq.read_schema(trusted).names
    except Exception as e:  # noqa: BLE001 - not a parquet file at all
        raise CurateError(f"--trusted {trusted}: not a parquet file ({type(e).__name__}: {e})") from None
    if "uid" not in names:
        raise CurateError(f"{trusted}: missing column 'uid' (expected trusted.parquet of `curate pool build-offline "
                          "--size large`)")
    listed = set(pq.read_table(trusted, columns=["uid"])["uid"].to_pylist())
    uids = [u for u in success_uids(pool) if u in listed]
    return uids, {"trusted_in_file": len(listed), "trusted_downloaded": len(uids)}


def _write_subset(subset: Path, uids: list[str], pool: Path, truth: Path, sources: tuple[str, ...], counts: dict,
                  rule: str | None = None, name: str = "scorer_trusted_subset") -> None:
    """SUBSET/uids.npy + manifest.json of a scorer training stage, rewritten only when the uid list changed."""
    from curate.core import uids as uidlib

    uidlib.write_subset(subset, uids, {
        "recipe": {"name": name, "rule": rule or f"truth.source in {list(sources)} and truth.noise == 'none'"
                   " and pool status == success"},
        "pool": str(pool.resolve()), "truth": str(truth.resolve()) if truth else None,
        "counts": {"subset": len(uids), **counts},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })


def train_scorer(cfg: ScorerConfig) -> dict:
    """Train the filtering network (cfg.variant) and write cfg.out; return a summary (up_to_date when nothing
    changed), also written to cfg.summary_path when it holds a report or a bootstrap / itm variant."""
    import resource

    t0 = time.perf_counter()
    c0 = time.process_time()
    ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if cfg.variant == "contrastive":
        s = _train_contrastive(cfg)
    else:
        s = _train_bootstrap(cfg)
    s["train_seconds"] = round(time.perf_counter() - t0, 1)
    if cfg.report:
        s.update(_report(cfg, s))
    if cfg.variant == "itm":
        s.update(_train_itm(cfg, s))
        s["report"]["columns"]["itm_score"] = score_auc(cfg.pool, s["scores_model_id"], Path(s["truth"]),
                                                        column="itm_score", heldout_only=True)
        if s.get("matcher"):
            s["report"]["columns"]["match_score"] = score_auc(cfg.pool, s["scores_model_id"], Path(s["truth"]),
                                                              column="match_score", heldout_only=True)
    s["seconds"] = round(time.perf_counter() - t0, 1)
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    s["cpu_seconds"] = {"main_process": round(time.process_time() - c0, 1),  # user + system
                        "child_processes": round(ch.ru_utime + ch.ru_stime - ch0.ru_utime - ch0.ru_stime, 1)}
    if cfg.report or cfg.variant != "contrastive":
        atomic.write_json(cfg.summary_path, s)
        s["summary"] = str(cfg.summary_path)
    return s


def _train_contrastive(cfg: ScorerConfig) -> dict:
    """The first scorer: CLIP on every trusted row (held-out rows included, as before the held-out rule)."""
    truth = Path(cfg.truth) if cfg.truth else find_truth(cfg.pool)
    if cfg.trusted is not None:
        return _train_contrastive_on(cfg, truth, *trusted_uids_from_file(cfg.pool, cfg.trusted),
                                     rule=f"uid in {cfg.trusted} and pool status == success")
    uids, counts = trusted_uids(cfg.pool, truth, cfg.sources)
    if len(uids) < 64:
        raise CurateError(f"{truth}: only {len(uids)} trusted rows ({', '.join(cfg.sources)}, noise none, downloaded) "
                          "in the pool; too few to train a scoring model")
    return _train_contrastive_on(cfg, truth, uids, counts, rule=None)


def _train_contrastive_on(cfg: ScorerConfig, truth: Path, uids: list[str], counts: dict, rule: str | None) -> dict:
    from benchmark.train import TrainConfig, train
    from curate.reshard.stage import ReshardConfig, reshard

    if len(uids) < 64:
        raise CurateError(f"{cfg.trusted}: only {len(uids)} trusted rows downloaded in the pool; too few to train a "
                          "scoring model")
    subset = cfg.work / "trusted"
    _write_subset(subset, uids, cfg.pool, truth, cfg.sources, counts, rule=rule)
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
        "variant": "contrastive", "heldout_rule": HELDOUT_RULE, "heldout_excluded_from_training": False,
    }


def _stage_samples(cfg: ScorerConfig) -> tuple[int, int]:
    """Samples seen by the bootstrap stages: whole batches, 5/7 and 2/7 of the scale's unless given."""
    from benchmark.scales import get_scale

    sc = get_scale(cfg.scale)
    bs = sc.batch_size

    def whole(n: int) -> int:
        return max(bs * sc.num_checkpoints, n // bs * bs)

    pre = cfg.pretrain_samples if cfg.pretrain_samples is not None else sc.samples_seen * 5 // 7
    fine = cfg.finetune_samples if cfg.finetune_samples is not None else sc.samples_seen * 2 // 7
    return whole(pre), whole(fine)


def _run_stage(cfg: ScorerConfig, name: str, uids: list[str], truth: Path | None, rule: str, counts: dict,
               samples: int, lr: float | None, init: Path | None) -> tuple[dict, Path, dict]:
    """One training stage: SUBSET of `uids` -> reshard -> an unofficial run of cfg.scale; (info, final.pt, reshard)."""
    from benchmark.train import TrainConfig, stale_run, train
    from curate.core.hashing import sha256_file
    from curate.reshard.stage import ReshardConfig, reshard

    subset = cfg.work / name
    _write_subset(subset, uids, cfg.pool, truth, cfg.sources, counts, rule=rule, name=f"scorer_{name}_subset")
    t0 = time.perf_counter()
    rs = reshard(ReshardConfig(subset=subset, pool=cfg.pool, progress=cfg.progress))
    rs = {**rs, "seconds": round(time.perf_counter() - t0, 1)}
    run = cfg.work / f"run-{name}-{cfg.scale}-seed{cfg.seed}"
    overrides: dict = {"samples_seen": samples}
    if lr is not None:
        overrides["lr"] = lr
    stale = stale_run(run, subset)
    if not stale and init is not None and (run / "info.json").is_file():
        try:  # stage 2 of an earlier stage 1: start again from the new weights
            old = json.loads((run / "info.json").read_text())
            stale = old.get("run", {}).get("init_checkpoint_sha256") != sha256_file(init)
        except ValueError:
            stale = True
    if stale or ((run / "info.json").is_file() and _overrides_of(run) != overrides):
        import shutil

        shutil.rmtree(run)
    t0 = time.perf_counter()
    info = train(TrainConfig(data=subset, scale=cfg.scale, out=run, seed=cfg.seed, device=cfg.device, resume=True,
                             workers=cfg.workers, progress=cfg.progress, unofficial=True, overrides=overrides,
                             init_checkpoint=init))
    info = {**info, "train_seconds": round(time.perf_counter() - t0, 1)}
    return info, run / info.get("final_checkpoint", "final.pt"), rs


def _overrides_of(run: Path) -> dict | None:
    try:
        info = json.loads((run / "info.json").read_text())
    except (OSError, ValueError):
        return None
    sc = info.get("run", {}).get("scale", {})
    return {k: sc.get(k) for k in ("samples_seen", "lr") if k in (info.get("overrides") or {})} or None


def _train_bootstrap(cfg: ScorerConfig) -> dict:
    """Stage 1 on the pool, stage 2 on the trusted subset, held-out rows in neither."""
    from benchmark.scales import get_scale

    if cfg.trusted is not None:
        truth = Path(cfg.truth) if cfg.truth else (find_truth(cfg.pool) if cfg.report else None)
        trusted, counts = trusted_uids_from_file(cfg.pool, cfg.trusted)
        trule = f"uid in {cfg.trusted}"
    else:
        truth = Path(cfg.truth) if cfg.truth else find_truth(cfg.pool)
        trusted, counts = trusted_uids(cfg.pool, truth, cfg.sources)
        trule = f"truth.source in {list(cfg.sources)} and truth.noise == 'none'"
    pool_uids = success_uids(cfg.pool)
    held_pool = is_heldout(pool_uids)
    held_trusted = is_heldout(trusted)
    pre_uids = [u for u, h in zip(pool_uids, held_pool) if not h]
    fine_uids = [u for u, h in zip(trusted, held_trusted) if not h]
    if len(fine_uids) < 64:
        raise CurateError(f"{cfg.trusted or truth}: only {len(fine_uids)} trusted rows outside the held-out fifth in "
                          "the pool; too few to train a scoring model")
    held = {"rule": HELDOUT_RULE, "pool_rows": len(pool_uids), "heldout_rows": int(held_pool.sum()),
            "trusted_rows": len(trusted), "heldout_trusted_rows": int(held_trusted.sum())}
    pre_n, fine_n = _stage_samples(cfg)
    lr = cfg.finetune_lr if cfg.finetune_lr is not None else get_scale(cfg.scale).lr / 2
    not_held = f" and not held out ({HELDOUT_RULE})"
    info1, final1, rs1 = _run_stage(cfg, "pretrain", pre_uids, truth, "pool status == success" + not_held,
                                    {"pool_success": len(pool_uids)}, pre_n, None, None)
    info2, final2, rs2 = _run_stage(cfg, "finetune", fine_uids, truth, trule + " and pool status == success" + not_held,
                                    counts, fine_n, lr, final1)
    data = final2.read_bytes()
    up_to_date = cfg.out.is_file() and hashlib.sha256(cfg.out.read_bytes()).digest() == hashlib.sha256(data).digest()
    if not up_to_date:
        atomic.write_bytes(cfg.out, data)
    arch = info2.get("model")
    return {
        "out": str(cfg.out), "arch": arch, "scale": cfg.scale, "seed": cfg.seed, "variant": cfg.variant,
        "truth": str(truth) if truth else None, "trusted": str(cfg.trusted) if cfg.trusted else None,
        "trusted_rule": trule, "trusted_rows": len(fine_uids), **counts, "heldout": held,
        "heldout_excluded_from_training": True,
        "stages": {
            "pretrain": {"rows": len(pre_uids), "samples_seen": pre_n, "steps": info1.get("steps"),
                         "resharded": rs1.get("n_written"), "run": str(final1.parent), "official": info1.get("official"),
                         "reshard_seconds": rs1["seconds"], "train_seconds": info1["train_seconds"]},
            "finetune": {"rows": len(fine_uids), "samples_seen": fine_n, "lr": lr, "steps": info2.get("steps"),
                         "resharded": rs2.get("n_written"), "run": str(final2.parent), "official": info2.get("official"),
                         "init_checkpoint": str(final1), "reshard_seconds": rs2["seconds"],
                         "train_seconds": info2["train_seconds"]},
        },
        "run": str(final2.parent), "steps": (info1.get("steps") or 0) + (info2.get("steps") or 0),
        "up_to_date": bool(up_to_date and info1.get("up_to_date") and info2.get("up_to_date")),
        "embed_command": f"curate embed --pool {cfg.pool} --model {arch} --pretrained {cfg.out}",
    }


def _report(cfg: ScorerConfig, s: dict) -> dict:
    """Embed the pool with the scorer (skipped when up to date) and measure clip_score's AUCs on held-out rows."""
    from curate.embed.stage import EmbedConfig, embed

    t0 = time.perf_counter()
    e = embed(EmbedConfig(pool=cfg.pool, model=s["arch"], pretrained=str(cfg.out), device=cfg.device,
                          batch_size=cfg.embed_batch, progress=cfg.progress))
    truth = Path(s["truth"]) if s.get("truth") else find_truth(cfg.pool)
    rep = {"columns": {"clip_score": score_auc(cfg.pool, e["model_id"], truth, column="clip_score",
                                               heldout_only=True)},
           "heldout_rule": HELDOUT_RULE, "heldout_excluded_from_training": s["heldout_excluded_from_training"]}
    return {"model_id": e["model_id"], "truth": str(truth), "embed_seconds": round(time.perf_counter() - t0, 1),
            "report": rep}


def _train_itm(cfg: ScorerConfig, s: dict) -> dict:
    """Train the ITM head on the trusted, not-held-out rows' embeddings and write itm_score for the pool."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from curate.core import uids as uidlib
    from curate.run import itm

    t0 = time.perf_counter()
    icfg = cfg.itm or itm.ItmConfig(seed=cfg.seed)
    files, uids, img, txt = itm.load_embeddings(cfg.pool, s["model_id"])
    flat = np.concatenate(uids)
    train_set = set(uidlib.decode(uidlib.load(cfg.work / "finetune" / "uids.npy")))
    valid = np.isfinite(img).all(axis=1) & np.isfinite(txt).all(axis=1)
    outside = np.flatnonzero(valid & ~is_heldout(list(flat)))  # rows outside the held-out fifth, with vectors
    rows = np.flatnonzero(np.fromiter((u in train_set for u in flat), bool, count=len(flat)) & valid)
    if len(rows) < 16:
        raise CurateError(f"{cfg.pool}: only {len(rows)} trusted rows have embeddings; too few to train the ITM head")
    meta = pq.read_table(cfg.pool / "metadata", columns=["uid", "text", "status", "sha256"])
    text_of, sha_of = {}, {}
    for u, t, st, h in zip(meta["uid"].to_pylist(), meta["text"].to_pylist(), meta["status"].to_pylist(),
                           meta["sha256"].to_pylist()):
        if st == "success":
            text_of[u], sha_of[u] = t, h
    digest = hashlib.sha256("\n".join(sorted(flat[rows])).encode() + json.dumps(asdict(icfg), sort_keys=True).encode()
                            + s["model_id"].encode()).hexdigest()
    old = None
    if cfg.head_path.is_file():
        try:
            old = torch.load(cfg.head_path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged head is retrained
            old = None
    up = old is not None and old.get("train_digest") == digest
    sid = itm.scores_id(s["arch"], cfg.head_path) if up else None  # a retrained head is a new file: set below
    # What the scores are a function of: the head (its training digest), the embeddings files and the pool's
    # metadata (the agreement features exclude byte-identical neighbours by sha256). When none changed, the
    # written scores are current and the neighbourhood search and scoring are skipped (a `curate demo` re-run).
    texts = [text_of.get(u, "") or "" for u in flat]
    mcfg, mdigest = None, ""
    if cfg.match:
        from curate.run import matcher

        mcfg = cfg.matcher or matcher.MatcherConfig(seed=cfg.seed)
        mrows = outside  # the matcher trains on the non-held-out pool
        mdigest = matcher.train_digest(list(flat[mrows]), mcfg, s["model_id"], sorted((cfg.pool / "shards").glob("*.tar")),
                                       hashlib.sha256("\n".join(texts).encode()).hexdigest())
    score_digest = itm.score_digest(digest + mdigest, files, sorted((cfg.pool / "metadata").glob("*.parquet")))
    if up and itm.scores_current(cfg.pool, sid, files, score_digest):
        stats = old["stats"]
        mstats = _saved_matcher_stats(cfg.matcher_path, mdigest) if mcfg else None
        return _itm_summary(cfg, s, sid, cfg.pool / "embeddings" / sid, stats, icfg, up, t0, scored=False,
                            matcher_stats=mstats, mcfg=mcfg)
    nb = None
    if icfg.neighbours > 0:  # reference rows: outside the held-out fifth (see itm.py "Neighbourhood agreement")
        ref = outside
        nb = itm.neighbourhood(img, txt, ref, [sha_of.get(u) or u for u in flat], icfg.neighbours, seed=icfg.seed)
    if up:
        state, stats = old["state_dict"], old["stats"]
    else:
        state, stats = itm.train_head(img[rows], txt[rows], [text_of.get(u, "") for u in flat[rows]], icfg,
                                      nb=nb, rows=rows)
        from curate.core.atomic import atomic_path

        with atomic_path(cfg.head_path, suffix=".pt") as tmp:
            torch.save({"state_dict": state, "config": asdict(icfg), "dims": int(img.shape[1]),
                        "embeddings_model_id": s["model_id"], "stats": stats,
                        "features": "[i, t, i*t, |i-t|]" + (f" + {list(itm.AGREEMENT_FEATURES)}" if nb else ""),
                        "train_digest": digest}, tmp)
    agree = None if nb is None else itm.agreement(nb, np.arange(len(flat)), np.arange(len(flat)))
    sc = itm.score(state, img.shape[1], icfg.hidden, img, txt, agree)
    columns = {itm.SCORE_COLUMN: sc}
    mstats = None
    if mcfg is not None:
        columns[matcher.MATCH_COLUMN], mstats = _run_matcher(cfg, mcfg, mdigest, flat, img, txt, texts, mrows)
    sid = sid or itm.scores_id(s["arch"], cfg.head_path)
    folder = itm.write_scores(cfg.pool, sid, files, uids, columns,
                              {"curate.embeddings_model_id": s["model_id"], "curate.scorer": str(cfg.head_path),
                               itm.SCORE_DIGEST_KEY: score_digest})
    return _itm_summary(cfg, s, sid, folder, stats, icfg, up, t0, scored=True, matcher_stats=mstats, mcfg=mcfg)


def _saved_matcher_stats(path: Path, digest: str) -> dict | None:
    """The saved matcher's checkpoint when it was trained for `digest`, else None."""
    import torch

    if not path.is_file():
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged checkpoint is retrained
        return None
    return ck if ck.get("train_digest") == digest else None


def _run_matcher(cfg: ScorerConfig, mcfg, mdigest: str, flat, img, txt, texts: list[str], mrows) -> tuple:
    """Train the pool matcher (or reuse the one saved for `mdigest`) and score every row; (match_score, stats).

    Cross-fitted, because a matcher scores the pairs it trained on higher than unseen ones (it memorises some),
    and a filter ranks all rows on one scale: for each non-held-out fold f (1-4, `uid_fold`) a matcher trains on
    the other three and scores fold f, so no row is scored by a model that saw it. The held-out fold 0 (and any
    row outside `mrows`) is scored by fold 1's matcher, which saw none of it. (Two matchers on two folds each
    were measured first: each sees 40% of the pool instead of 60%, and held-out caption-swap AUC fell from 0.93
    to 0.90; perf/RESULTS.md.)"""
    import numpy as np
    import torch

    from curate.core.atomic import atomic_path
    from curate.run import matcher

    t0 = time.perf_counter()
    thumbs, found = matcher.thumbnails(cfg.pool, flat, mcfg, workers=cfg.workers, progress=cfg.progress)
    t_thumbs = time.perf_counter() - t0
    mrows = np.asarray(mrows, np.int64)
    fold = uid_fold(list(flat[mrows]))
    parts = [mrows[fold == f] for f in range(1, HELDOUT_MODULUS)]  # part i is scored by matcher i
    ck = _saved_matcher_stats(cfg.matcher_path, mdigest)
    if ck is not None:
        inp, _, _ = matcher.inputs(img, txt, thumbs, found, texts, mcfg, mean=ck["thumb_mean"].numpy(),
                                   std=ck["thumb_std"].numpy())
        states, stats = ck["state_dicts"], ck["stats"]
    else:
        fit = mrows[found[mrows]]
        inp, mean, std = matcher.inputs(img, txt, thumbs, found, texts, mcfg, fit_rows=fit)
        states, per = [], []
        for f in range(1, HELDOUT_MODULUS):
            train_rows = mrows[fold != f]
            st, ps = matcher.train(inp, train_rows[inp.ok[train_rows]], mcfg, progress=cfg.progress)
            states.append(st)
            per.append(ps)
        stats = {"rows": int(inp.ok[mrows].sum()), "models": per,
                 "cross_fitted": "matcher i trains on the non-held-out folds but fold i and scores fold i (i = 1-4); "
                                 "matcher 1 scores the held-out fold 0",
                 "no_thumbnail": int((~found).sum()), "thumbnail_seconds": round(t_thumbs, 1),
                 "train_seconds": round(time.perf_counter() - t0 - t_thumbs, 1)}
        with atomic_path(cfg.matcher_path, suffix=".pt") as tmp:
            torch.save({"state_dicts": states, "config": asdict(mcfg), "thumb_mean": torch.from_numpy(mean),
                        "thumb_std": torch.from_numpy(std), "stats": stats, "train_digest": mdigest}, tmp)
    out = matcher.score(states[0], inp, mcfg)  # fold 1 and every row no matcher trained on
    for st, part in zip(states[1:], parts[1:]):
        out[part] = matcher.score(st, inp, mcfg)[part]
    return out, {**stats, "seconds": round(time.perf_counter() - t0, 1)}


def _itm_summary(cfg: ScorerConfig, s: dict, sid: str, folder: Path, stats: dict, icfg, up: bool, t0: float,
                 scored: bool, matcher_stats: dict | None = None, mcfg=None) -> dict:
    from curate.run import itm

    out = {"scores_model_id": sid, "scores": str(folder), "itm_head": str(cfg.head_path),
           "itm": {**stats, "config": asdict(icfg), "up_to_date": up, "scored": scored,
                   "seconds": round(time.perf_counter() - t0, 1)},
           "up_to_date": bool(s.get("up_to_date") and up),
           "score_step": f"score: {{model: {s['arch']}-itm, column: {itm.SCORE_COLUMN}, keep_top_fraction: 0.3}}"}
    if mcfg is not None:
        from curate.run import matcher

        ms = matcher_stats or {}
        ms = ms.get("stats", ms)  # a saved checkpoint holds its stats under "stats"
        out["matcher"] = {**ms, "config": asdict(mcfg), "checkpoint": str(cfg.matcher_path), "scored": scored}
        out["match_step"] = (f"score: {{model: {s['arch']}-itm, column: {matcher.MATCH_COLUMN}, "
                             "keep_top_fraction: 0.3}")
    return out


def roc_auc(positive, score) -> float | None:
    """ROC AUC of `score` for positives vs the rest (Mann-Whitney U with tied scores counting one half)."""
    import numpy as np

    positive = np.asarray(positive, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    order = score.argsort(kind="stable")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    _, inv, counts = np.unique(score, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inv, weights=ranks) / counts)[inv]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def score_auc(pool: Path, folder_id: str, truth: Path, column: str = "clip_score", heldout_only: bool = True,
              seed: int = RANDOM_BASELINE_SEED) -> dict:
    """ROC AUC of a score column for clean rows (noise ``none``) against each recorded noise kind.

    Reads POOL/embeddings/<folder_id>/*.parquet's `column` and truth.parquet's `noise`; with `heldout_only` only
    rows of the held-out fifth (`HELDOUT_RULE`) count. Per kind: {auc, n_clean, n_noisy, random_auc}, where
    random_auc is the AUC of a seeded uniform random score on the same rows (what chance looks like at that
    size). Kinds whose rows have no score (never downloaded) are absent. 1.0 = every clean row above every
    noisy one; 0.5 = chance; below 0.5 = the scorer prefers that noise.
    """
    import duckdb
    import numpy as np

    emb = Path(pool) / "embeddings" / folder_id
    if not any(emb.glob("*.parquet")):
        raise CurateError(f"{emb}: no embeddings; run `curate embed` with this model first")
    con = duckdb.connect()
    have = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet({_q(emb / '*.parquet')})").fetchall()}
    if column not in have:
        con.close()
        raise CurateError(f"{emb}: no column {column!r} (have {', '.join(sorted(have))})")
    rows = con.execute(
        f"""SELECT e.uid, t.noise, e.{column} FROM read_parquet({_q(emb / '*.parquet')}) e
            JOIN (SELECT DISTINCT uid, noise FROM read_parquet({_q(truth)})) t USING (uid)
            WHERE e.{column} IS NOT NULL AND NOT isnan(e.{column}) ORDER BY e.uid""").fetchall()
    con.close()
    uid = [r[0] for r in rows]
    noise = np.array([r[1] for r in rows], dtype=object)
    score = np.array([r[2] for r in rows], dtype=np.float64)
    if heldout_only:
        keep = is_heldout(uid)
        noise, score = noise[keep], score[keep]
    rand = np.random.default_rng(seed).random(len(score))
    clean = noise == "none"
    kinds = {}
    for kind in sorted(set(noise.tolist()) - {"none"}):
        sel = clean | (noise == kind)
        a = roc_auc(clean[sel], score[sel])
        kinds[kind] = {"auc": a, "n_clean": int(clean.sum()), "n_noisy": int((noise == kind).sum()),
                       "random_auc": roc_auc(clean[sel], rand[sel])}
    return {"column": column, "folder": folder_id, "heldout_only": heldout_only, "rows": int(len(score)),
            "n_clean": int(clean.sum()), "kinds": kinds}


def format_report(report: dict) -> str:
    """The AUC table train-scorer prints: one line per (score column, noise kind)."""
    lines = [f"ROC AUC, clean (noise none) vs each noise kind, on held-out rows ({report['heldout_rule']})"
             + ("" if report.get("heldout_excluded_from_training") else
                " -- NOTE: this variant trained on held-out trusted rows too")]
    for col, r in report["columns"].items():
        for kind, k in r["kinds"].items():
            a = "  n/a" if k["auc"] is None else f"{k['auc']:.3f}"
            ra = "  n/a" if k["random_auc"] is None else f"{k['random_auc']:.3f}"
            lines.append(f"  {col:<11} {kind:<20} {a}  (random {ra}; {k['n_clean']} clean, {k['n_noisy']} noisy)")
    return "\n".join(lines)


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
@click.option("--variant", type=click.Choice(VARIANTS), default="contrastive", show_default=True,
              help="contrastive: CLIP on the trusted rows (DFN); bootstrap: pretrain on the pool, fine-tune on the "
              "trusted rows (BLIP CapFilt); itm: bootstrap + an image-text matching head with hard negatives.")
@click.option("--trusted", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Trusted subset as a parquet with a uid column (the large pool: POOL_BUILD/trusted.parquet, "
              "defined by source). Default: --source rows with noise 'none'.")
@click.option("--pretrain-samples", type=int, default=None, help="bootstrap stage 1 samples seen (default 5/7 of "
              "the scale's).")
@click.option("--finetune-samples", type=int, default=None, help="bootstrap stage 2 samples seen (default 2/7).")
@click.option("--report/--no-report", default=None,
              help="Embed the pool and report ROC AUCs on held-out rows (default: on for bootstrap / itm).")
@click.option("--no-matcher", is_flag=True, help="itm variant: do not train the pool matcher (match_score).")
@click.option("--no-progress", is_flag=True)
def train_scorer_cmd(pool, truth, out, sources, scale, seed, device, variant, trusted, pretrain_samples,
                     finetune_samples, report, no_matcher, no_progress) -> None:
    """Train a CLIP filtering network on the pool's trusted subset (Data Filtering Networks, offline).

    The trusted subset is the rows of clean-caption sources (Tux Paint, Twemoji) with no injected noise, or the
    uids of --trusted (the large pool's trusted.parquet). Uses the project's reshard and trainer at a fixed scale;
    re-running with unchanged inputs does nothing. Score a pool with it: `curate embed --pool POOL --model
    curate-tiny --pretrained OUT`. --variant bootstrap pretrains on the pool first; --variant itm adds an
    image-text matching head whose itm_score the `score` filter selects, and the pool matcher's match_score
    (image thumbnails + caption tokens + the CLIP vectors, trained on the pool; the stronger score). Both hold a fifth of the pool out of
    training and print the ROC AUC per noise kind on it (also in OUT-stem.summary.json).
    """
    s = train_scorer(ScorerConfig(pool=pool, out=out, truth=truth, sources=tuple(sources), scale=scale, seed=seed,
                                  device=device, progress=not no_progress, variant=variant, trusted=trusted,
                                  pretrain_samples=pretrain_samples, finetune_samples=finetune_samples, report=report,
                                  match=not no_matcher))
    state = "already up to date" if s["up_to_date"] else "written"
    where = s.get("trusted_in_truth") or s.get("trusted") or ""
    click.echo(f"{s['out']} ({state}): {s['arch']} trained at scale {scale} ({s['variant']}) on {s['trusted_rows']} "
               f"trusted pairs ({where})")
    if s.get("report"):
        click.echo(format_report(s["report"]))
    if s.get("score_step"):
        click.echo(f"itm_score written to {s['scores']}; recipe step: - {s['score_step']}")
    if s.get("match_step"):
        click.echo(f"match_score written beside it; recipe step: - {s['match_step']}")
    if s.get("summary"):
        click.echo(f"summary: {s['summary']}")
    if not s.get("report"):
        click.echo(f"next: {s['embed_command']}")
