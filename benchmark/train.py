"""Train CLIP on a subset's shards with the fixed hyperparameters of a scale (DataComp's protocol).

The recipe is DataComp's, built from open_clip's parts: the model from open_clip's factory (through
curate.clip.models, so the CPU architectures work), open_clip's `ClipLoss` (local loss + gather with
gradient under DDP), AdamW with weight decay on weight matrices only, open_clip_train's cosine
schedule with linear warmup, a fixed number of samples seen (resampled shards), logit scale clamped
to 100, AMP (fp16 + GradScaler) on GPU. Only the seed, the device and paths may change a run; any
hyperparameter override needs `--unofficial` and is recorded in RUN/info.json.

Outputs (RUN/):
    checkpoints/epoch_{k}.pt   after each of the scale's `num_checkpoints` equal segments: weights
                               (open_clip-loadable), optimizer, scaler, step; atomic
    final.pt                   the final weights only: open_clip.create_model_and_transforms(arch, pretrained=...)
    log.jsonl                  one line per step: step, loss, lr, samples_per_s, samples_seen, logit_scale
    info.json                  scale + hyperparameters, official, subset hash, seed, versions, status

Why training is cut into segments: each segment starts a fresh, seeded data loader (benchmark/data.py),
so resuming from checkpoint k replays exactly what an uninterrupted run does after it.
Multi-GPU / multi-node: launch with `torchrun --nproc_per_node N -m benchmark.train ...`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from curate.core.hashing import sha256_file
from benchmark.data import StreamConfig, find_shards, make_loader
from benchmark.scales import Scale, get_scale, override, parse_overrides
from curate.core.version import __version__
from curate.core.atomic import atomic_path, cleanup_temp_files, write_json, write_text
from curate.core.errors import CurateError

log = logging.getLogger(__name__)

# Fault injection for kill/resume tests only: seconds to sleep after each step (results unchanged).
_FAULT_STEP_SLEEP = "CURATE_FAULT_STEP_SLEEP"


@dataclass
class TrainConfig:
    """What `curate train` needs. Only seed, device, workers and paths may vary between official runs."""

    data: Path
    scale: str
    out: Path | None = None  # default: <data>/runs/<scale>-seed<seed>
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    workers: int = 2
    unofficial: bool = False
    overrides: dict = field(default_factory=dict)
    progress: bool = True
    # weights loaded before step 0 (a checkpoint `final.pt` or `epoch_k.pt`): fine-tuning, e.g. the bootstrapped
    # scorer of `curate train-scorer`. Such a run is not a benchmark run (official: false, its sha256 is part of
    # the fingerprint, so a resume must name the same file).
    init_checkpoint: Path | None = None

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        self.init_checkpoint = Path(self.init_checkpoint) if self.init_checkpoint else None
        if self.out is None:
            self.out = self.data / "runs" / f"{self.scale}-seed{self.seed}"
        self.out = Path(self.out)


# ---------------------------------------------------------------------------------------------
# helpers


def _dist_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment (1 process without it)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def subset_hash(data: Path, shards: list[str]) -> str:
    """sha256 of SUBSET/uids.npy (DataComp's unit of exchange), else of the shard listing."""
    uids = data / "uids.npy"
    if uids.exists():
        return sha256_file(uids)
    h = hashlib.sha256()
    for s in shards:
        h.update(f"{Path(s).name}:{os.path.getsize(s)}".encode())
    return h.hexdigest()


def stale_run(run: Path, subset: Path) -> bool:
    """True when RUN was trained on a different version of SUBSET (the recipe or pool changed since)."""
    info_p = run / "info.json"
    if not info_p.is_file():
        return False
    try:
        info = json.loads(info_p.read_text())
    except ValueError:
        return True
    return info.get("subset_hash") != subset_hash(subset, find_shards(subset))


def _versions() -> dict:
    import open_clip
    import torch

    return {"curate": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "python": platform.python_version()}


def reproducibility(device: str) -> dict:
    """What else changes a run's weights at the same seed and data: torch's intra-op thread count
    (OMP_NUM_THREADS=1 vs 2 changed weights by 7e-5), torch version, device and CPU kind.

    Recorded in info.json but kept out of the fingerprint: the protocol does not fix them, and a run
    resumed on another machine or with other threads must still resume (the change is then on record).
    """
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    out = {"torch_threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device), "cpu": cpu}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        out.update(gpu=torch.cuda.get_device_name(torch.device(device)), cuda=torch.version.cuda)
    return out


def _param_groups(model, weight_decay: float) -> list[dict]:
    """open_clip_train's rule: no weight decay on gains, biases, norms and the logit scale."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _latest_checkpoint(ckpt_dir: Path, n: int) -> tuple[int, Path] | None:
    for k in range(n, 0, -1):
        p = ckpt_dir / f"epoch_{k}.pt"
        if p.exists():
            return k, p
    return None


def _truncate_log(path: Path, max_step: int) -> None:
    """Keep only complete log lines up to `max_step` (a killed run may have logged past its checkpoint)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= max_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    write_text(path, "".join(line + "\n" for line in keep))


# ---------------------------------------------------------------------------------------------
# stage function


def train(cfg: TrainConfig) -> dict:
    """Train at `cfg.scale` on `cfg.data`'s shards; return the summary also written to RUN/info.json."""
    import open_clip
    import torch
    import torch.distributed as dist
    from open_clip.loss import ClipLoss
    from open_clip_train.scheduler import cosine_lr
    from tqdm import tqdm

    from curate.clip.models import create_model_for_training, register_configs, resolve_device

    scale: Scale = override(get_scale(cfg.scale), cfg.overrides, cfg.unofficial)
    official = scale == get_scale(cfg.scale) and cfg.init_checkpoint is None
    if cfg.init_checkpoint is not None and not cfg.init_checkpoint.is_file():
        raise CurateError(f"init_checkpoint {cfg.init_checkpoint}: no such file")
    shards = find_shards(cfg.data)
    rank, local_rank, world = _dist_env()
    if scale.batch_size % world:
        raise CurateError(f"batch size {scale.batch_size} of scale {scale.name} is not divisible by {world} processes")

    fingerprint_fields = {
        "scale": scale.as_dict(), "official": official, "subset_hash": subset_hash(cfg.data, shards),
        "seed": cfg.seed, "world_size": world, "workers": cfg.workers,
    }
    if cfg.init_checkpoint is not None:  # only then: the fingerprints of existing runs stay what they were
        fingerprint_fields["init_checkpoint_sha256"] = sha256_file(cfg.init_checkpoint)
    fingerprint = hashlib.sha256(json.dumps(fingerprint_fields, sort_keys=True).encode()).hexdigest()[:16]
    out = cfg.out
    ckpt_dir = out / "checkpoints"
    info_path = out / "info.json"
    old = json.loads(info_path.read_text()) if info_path.exists() else None
    if old is not None and old.get("fingerprint") == fingerprint and old.get("status") == "done":
        return {**old, "up_to_date": True}
    if old is not None and old.get("fingerprint") != fingerprint:
        diff = sorted(k for k in fingerprint_fields if old.get("run", {}).get(k) != fingerprint_fields[k])
        raise CurateError(f"{out}: holds a different run (differs in: {', '.join(diff) or 'version'}); "
                          "use another --out")
    if old is not None and not cfg.resume:
        raise CurateError(f"{out}: holds an unfinished run; pass --resume to continue it, or use another --out")

    # ---- distributed + device
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
    device = resolve_device(cfg.device)
    if device == "cuda" and world > 1:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    is_main = rank == 0
    use_amp = device.startswith("cuda")

    # ---- model, loss, optimizer
    register_configs()
    torch.manual_seed(cfg.seed)
    model, preprocess_train, _ = create_model_for_training(scale.model, device=device)
    tokenizer = open_clip.get_tokenizer(scale.model)
    if scale.grad_checkpointing:
        model.set_grad_checkpointing(True)
    raw_model = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if use_amp else None)
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world)
    optimizer = torch.optim.AdamW(_param_groups(raw_model, scale.weight_decay), lr=scale.lr,
                                  betas=(scale.beta1, scale.beta2), eps=scale.eps)
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    steps = scale.steps
    scheduler = cosine_lr(optimizer, scale.lr, scale.warmup, steps)
    bounds = [0] + scale.checkpoint_steps()

    # ---- resume
    start_seg, step = 0, 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        cleanup_temp_files(out)
    latest = _latest_checkpoint(ckpt_dir, scale.num_checkpoints) if cfg.resume else None
    if latest is not None:
        start_seg, path = latest
        ck = torch.load(path, map_location=device, weights_only=True)
        if ck.get("fingerprint") != fingerprint:
            raise CurateError(f"{path}: checkpoint of a different run; cannot resume from it")
        raw_model.load_state_dict(ck["state_dict"])
        optimizer.load_state_dict(ck["optimizer"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        step = int(ck["step"])
        log.info("resuming %s from %s (step %d)", out, path.name, step)
    elif cfg.init_checkpoint is not None:
        try:
            init = torch.load(cfg.init_checkpoint, map_location=device, weights_only=True)
            raw_model.load_state_dict(init.get("state_dict", init) if isinstance(init, dict) else init)
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file surfaces as pickle/Key/Runtime errors alike
            raise CurateError(f"init_checkpoint {cfg.init_checkpoint}: cannot load {scale.model} weights from it "
                              f"({type(e).__name__}: {e})") from None
    if is_main:
        _truncate_log(out / "log.jsonl", step)  # drop what a killed run logged after its last checkpoint

    info = {
        "status": "running", "fingerprint": fingerprint, "run": fingerprint_fields,
        "scale": scale.name, "official": official, "overrides": {k: getattr(scale, k) for k in cfg.overrides}
        if not official else {}, "subset_hash": fingerprint_fields["subset_hash"], "data": str(cfg.data),
        "n_shards": len(shards), "seed": cfg.seed, "device": device, "world_size": world, "amp": use_amp,
        "versions": _versions(), "reproducibility": reproducibility(device),
        "steps": steps, "samples_seen": steps * scale.batch_size,
        "checkpoints": [f"checkpoints/epoch_{k}.pt" for k in range(1, scale.num_checkpoints + 1)],
        "final_checkpoint": "final.pt", "model": scale.model,
    }
    if cfg.init_checkpoint is not None:
        info["init_checkpoint"] = {"path": str(cfg.init_checkpoint),
                                   "sha256": fingerprint_fields["init_checkpoint_sha256"]}
    # a resumed run keeps the settings of its earlier sessions when they differ (its weights depend on them)
    earlier = list((old or {}).get("reproducibility_earlier", []))
    if old and old.get("reproducibility") and old["reproducibility"] != info["reproducibility"]:
        earlier.append(old["reproducibility"])
    if earlier:
        info["reproducibility_earlier"] = earlier
    if is_main:
        write_json(info_path, info)

    # ---- train
    per_rank_bs = scale.batch_size // world
    sleep_s = float(os.environ.get(_FAULT_STEP_SLEEP, "0") or 0)
    bar = tqdm(total=steps, initial=step, unit="step", desc=f"train {scale.name}",
               disable=not (cfg.progress and is_main) or None)
    logf = open(out / "log.jsonl", "a") if is_main else None
    t_start = time.perf_counter()
    step0 = step
    skipped = 0
    model.train()
    try:
        for seg in range(start_seg, scale.num_checkpoints):
            n_batches = bounds[seg + 1] - bounds[seg]
            loader = make_loader(
                StreamConfig(shards=shards, batch_size=per_rank_bs, n_batches=n_batches, seed=cfg.seed,
                             segment=seg, rank=rank, shuffle_buffer=scale.shuffle_buffer),
                preprocess_train, tokenizer, cfg.workers,
            )
            t_last = time.perf_counter()
            for images, texts in loader:
                images = images.to(device, non_blocking=True)
                texts = texts.to(device, non_blocking=True)
                lr = scheduler(step)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                    img_f, txt_f, logit_scale = model(images, texts)[:3]
                    loss = loss_fn(img_f, txt_f, logit_scale)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                with torch.no_grad():
                    raw_model.logit_scale.clamp_(0, math.log(100))
                step += 1
                now = time.perf_counter()
                if is_main:
                    rec = {"step": step, "loss": round(float(loss.item()), 6), "lr": lr,
                           "samples_per_s": round(scale.batch_size / max(now - t_last, 1e-9), 2),
                           "samples_seen": step * scale.batch_size,
                           "logit_scale": round(float(raw_model.logit_scale.exp().item()), 4)}
                    logf.write(json.dumps(rec) + "\n")
                    logf.flush()
                    bar.update()
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.2e}")
                t_last = now
                if sleep_s:
                    time.sleep(sleep_s)
            if step != bounds[seg + 1]:
                raise RuntimeError(f"segment {seg} yielded {step - bounds[seg]} batches, expected {n_batches}")
            skipped += getattr(loader.dataset, "skipped", 0)
            if is_main:
                state = {
                    "state_dict": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else {}, "step": step,
                    "epoch": seg + 1, "fingerprint": fingerprint, "scale": scale.name, "seed": cfg.seed,
                }
                ckpt_dir.mkdir(parents=True, exist_ok=True)
                with atomic_path(ckpt_dir / f"epoch_{seg + 1}.pt", suffix=".pt") as tmp:
                    torch.save(state, tmp)
            if world > 1:
                dist.barrier()
    finally:
        bar.close()
        if logf is not None:
            logf.close()

    seconds = time.perf_counter() - t_start
    if is_main:
        from curate.clip.models import save_checkpoint

        save_checkpoint(raw_model, out / "final.pt", extra={"scale": scale.name, "seed": cfg.seed, "step": step})
        info.update(status="done", seconds_this_session=round(seconds, 1),
                    samples_per_s_this_session=round((step - step0) * scale.batch_size / seconds, 1) if seconds else None)
        write_json(info_path, info)
    if world > 1:
        dist.barrier()
    return info


@click.command("train")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="SUBSET folder (its shards/ from `curate reshard`) or a folder of webdataset .tar shards.")
@click.option("--scale", required=True, help="Scale from benchmark/scales.py: small, medium, large, xlarge (DataComp), "
              "tiny (minutes on a CPU), debug (seconds).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="RUN folder. Default: DATA/runs/<scale>-seed<seed>.")
@click.option("--seed", default=0, show_default=True, help="Random seed (model init, shard sampling, shuffling, crops).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda, cuda:N.")
@click.option("--resume", is_flag=True, help="Continue an unfinished run in --out from its last checkpoint.")
@click.option("--workers", default=2, show_default=True,
              help="Data loader worker processes per training process (part of the run: keep it when resuming).")
@click.option("--unofficial", is_flag=True, help="Allow --set; the run is marked official: false and cannot be "
              "compared with benchmark runs.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a scale hyperparameter (needs --unofficial), e.g. --set lr=1e-3.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train_cmd(data, scale, out, seed, device, resume, workers, unofficial, sets, no_progress) -> None:
    """Train CLIP with the fixed hyperparameters of SCALE on the subset's shards.

    Samples seen, batch size, learning rate schedule and optimizer come from the scale (DataComp's
    protocol); the subset size does not change them (shards are resampled). Writes RUN/checkpoints,
    RUN/final.pt (loads with open_clip), RUN/log.jsonl and RUN/info.json. Re-running a finished run
    does nothing; --resume continues a killed run to the same final weights. For several GPUs or
    nodes launch with `torchrun --nproc_per_node N -m benchmark.train ...`.
    """
    cfg = TrainConfig(data=data, scale=scale, out=out, seed=seed, device=device, resume=resume, workers=workers,
                      unofficial=unofficial, overrides=parse_overrides(sets), progress=not no_progress)
    s = train(cfg)
    if _dist_env()[0] != 0:
        return
    if s.get("up_to_date"):
        click.echo(f"train: {cfg.out} already up to date ({s['scale']}, {s['steps']} steps), nothing to do")
    else:
        click.echo(f"train: {s['scale']} done, {s['steps']} steps, {s['samples_seen']} samples seen; "
                   f"weights in {cfg.out / 'final.pt'}" + ("" if s["official"] else " (UNOFFICIAL run)"))


if __name__ == "__main__":  # torchrun --nproc_per_node N -m benchmark.train ...
    train_cmd(sys.argv[1:], standalone_mode=True)
