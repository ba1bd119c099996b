"""`curate embed`: open_clip image/text embeddings and CLIP scores for every successful pool row.

Output, one file per pool shard (docs/FORMATS.md, "Embeddings"):
    POOL/embeddings/<model-id>/{shard:08d}.parquet
        uid        string
        image_emb  fixed_size_list<float16>[d]  L2-normalised; null when the image cannot be decoded
        text_emb   fixed_size_list<float16>[d]  L2-normalised
        clip_score float32                      cosine(image, text) from the float32 vectors; null with image_emb
        error      string                       null, or why the image has no embedding
    key-value metadata: curate.format, curate.model_id, curate.arch, curate.pretrained, curate.dims,
    curate.shard, and a fingerprint of the shard it came from (so a changed shard is recomputed, an
    unchanged one skipped).

Rows == the shard's `status == "success"` metadata rows, same uids, same order: nothing is dropped
silently. Each file is written atomically, so a killed run resumes at the first unfinished shard;
batches never span shards, so a shard's bytes do not depend on which other shards ran with it.

How the work is laid out (why it is fast):
  * one process holds the model (loaded once); decode + preprocess + tokenize run ahead of it in
    torch DataLoader worker processes (one shard per worker; 1 on CPU, 4 on GPU), overlapping the
    forward pass; a thread-pool mode exists too (`--decode thread`) and was measured against it in
    perf/bench_embed.py;
  * JPEGs decode at reduced scale (PIL draft, libjpeg's DCT scaling) when the model's preprocessing
    shrinks them to its input size anyway (`draft_side`; `--full-decode` turns it off); on 256-512 px
    images that removes most of the decode + resize CPU, which is what bounds embedding on CPU;
  * torch.inference_mode, channels_last on CPU, fp16 autocast on CUDA (curate.clip.models.autocast);
  * text is encoded only up to the longest caption of the batch instead of the model's full context
    (exact for causal, argmax-pooled CLIP text towers: padding after the end token cannot influence
    it), which is most of the text cost for short captions;
  * with `--workers N>1` or `--ray-address`, Ray actors (one per GPU, or per `--cpus-per-worker`)
    each hold the model once and pull shards; without them there is no Ray at all.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import click

from curate.clip import models
from curate.core.errors import CurateError
from curate.core.parallel import RayActor
from curate.core.stage import StageSummary
from curate.pool.io import (
    MAX_IMAGE_PIXELS,
    ImageDecodeError,
    Shard,
    decode_image,
    iter_samples,
    read_shard_metadata,
)
from curate.pool.pool import Pool

log = logging.getLogger(__name__)
FORMAT_VERSION = "1"


@dataclass
class EmbedConfig:
    """What `embed` needs. `workers` counts model-holding processes (Ray actors when > 1).

    `decode` says where images are decoded and preprocessed while the model runs: "process" (a
    torch DataLoader with `loader_workers` worker processes; the default), "thread" (a background
    thread with `loader_workers` decode threads), "inline" (no overlap); "auto" = process.
    `loader_workers` None: 1 process on CPU (the best of the modes in perf/RESULTS.md on 2 cores),
    4 on GPU, 2 threads. `jpeg_draft` lets JPEGs decode at reduced scale where the model's preprocessing
    resizes them down anyway (see `draft_side`); False decodes every image at full size.
    `model_threads` None: on CPU in process mode the model gets the threads the loader processes leave
    (torch's intra-op threads - loader_workers, at least 1): measured on 2 idle cores it runs 1.5x faster than letting torch's
    two intra-op threads contend with the loader process (perf/RESULTS.md, "Embedding vs the pipeline limit").
    Float results can differ in the last bit between thread counts, so a resumed run that must give
    byte-identical files uses the same `decode` / `loader_workers` / `model_threads` as the run it resumes.
    """

    pool: Path
    model: str = "ViT-B-32"
    pretrained: str | None = None
    batch_size: int = 256
    workers: int = 1
    loader_workers: int | None = None
    decode: str = "auto"
    device: str = "auto"
    ray_address: str | None = None
    cpus_per_worker: int = 2
    shards: list[int] | None = None
    max_pixels: int = MAX_IMAGE_PIXELS
    jpeg_draft: bool = True
    model_threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.pool = Path(self.pool)
        if self.batch_size < 1:
            raise CurateError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.workers < 1:
            raise CurateError(f"--workers must be >= 1, got {self.workers}")
        if self.decode not in ("auto", "thread", "process", "inline"):
            raise CurateError(f"--decode must be auto, thread, process or inline, got {self.decode!r}")


# ----------------------------------------------------------------------------------------------
# Which shards are already done


def shard_fingerprint(shard: Shard) -> dict[str, str]:
    """What an embeddings file was computed from: the shard's metadata bytes and tar size.

    Hashing the (small) metadata file catches any re-download of the shard; the tar is only sized,
    since hashing gigabytes on every rerun would cost more than the check saves.
    """
    h = hashlib.sha256(shard.metadata.read_bytes()).hexdigest()
    size = shard.tar.stat().st_size if shard.tar.exists() else -1
    return {"curate.source_metadata_sha256": h, "curate.source_tar_size": str(size)}


def output_path(pool: Path, mid: str, shard: Shard) -> Path:
    return pool / "embeddings" / mid / f"{shard.name}.parquet"


def is_up_to_date(path: Path, mid: str, shard: Shard) -> bool:
    """True when `path` is a complete embeddings file for this model and this exact shard."""
    import pyarrow.parquet as pq

    if not path.exists():
        return False
    try:
        md = pq.ParquetFile(path).schema_arrow.metadata or {}
    except Exception:
        return False  # unreadable: recompute
    md = {k.decode(): v.decode() for k, v in md.items()}
    if md.get("curate.model_id") != mid or md.get("curate.format") != FORMAT_VERSION:
        return False
    return all(md.get(k) == v for k, v in shard_fingerprint(shard).items())


# ----------------------------------------------------------------------------------------------
# Decode side (runs in DataLoader worker processes)


@dataclass
class ShardJob:
    """A shard's successful rows, as the decode side needs them."""

    shard: Shard
    uids: list[str]
    keys: list[str]
    texts: list[str]


def load_jobs(shards: list[Shard]) -> list[ShardJob]:
    jobs = []
    for s in shards:
        t = read_shard_metadata(s, columns=["uid", "key", "text"], success_only=True)
        texts = [x if x is not None else "" for x in t["text"].to_pylist()]
        jobs.append(ShardJob(s, t["uid"].to_pylist(), t["key"].to_pylist(), texts))
    return jobs


def draft_side(preprocess) -> int | None:
    """The side S to pass `decode_image(draft_size=S)` for this preprocess, or None when drafting is unsafe.

    Safe only when the transform starts by resizing the shortest side to S (open_clip's eval transform:
    Resize(S) then CenterCrop(S)): a JPEG drafted with S keeps both sides >= S, so that resize still only
    shrinks and the crop sees the same region; only the resampling filter differs (measured in
    perf/RESULTS.md, "Embedding vs the pipeline limit"). Any other first step (an exact (h, w) resize, a
    max_size, open_clip's keep-ratio or longest-side resizes, a custom transform) gets None: full decode.
    """
    from torchvision import transforms as T

    steps = getattr(preprocess, "transforms", None)
    if not steps or type(steps[0]) is not T.Resize or steps[0].max_size is not None:
        return None
    size = steps[0].size
    if isinstance(size, (list, tuple)):
        if len(size) != 1:
            return None
        size = size[0]
    return int(size) if isinstance(size, int) and size > 0 else None


class ShardBatches:
    """Iterable over batches of decoded, preprocessed images and tokenized captions for shards.

    A batch covers rows of one shard only (deterministic boundaries: every `batch_size` rows); the
    last batch of a shard carries ``final=True``. As a torch IterableDataset, worker w takes shards
    w, w+n, ... so each shard is read by exactly one process, sequentially.
    """

    def __init__(self, jobs: list[ShardJob], preprocess, tokenizer, batch_size: int, max_pixels: int,
                 threads: int = 0, draft_size: int | None = None):
        self.jobs, self.preprocess, self.tokenizer = jobs, preprocess, tokenizer
        self.batch_size, self.max_pixels, self.threads = batch_size, max_pixels, threads
        self.draft_size = draft_size  # decode_image's draft_size: from draft_side(preprocess), or None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import torch

        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for job in self.jobs[wid::n]:
            yield from self._shard_batches(job)

    def _shard_batches(self, job: ShardJob) -> Iterator[dict[str, Any]]:
        """Stream the shard's tar and emit a batch as soon as its rows are all resolved.

        Tars are written in metadata order, so memory stays at about one batch of image bytes; rows
        that arrive out of order are buffered until their batch is complete.
        """
        n, bs = len(job.uids), self.batch_size
        by_key: dict[str, list[int]] = {}
        for i, k in enumerate(job.keys):
            by_key.setdefault(k, []).append(i)
        images: dict[int, bytes] = {}
        errors: dict[int, str] = {}
        tar_errors: list[str] = []
        pool = None
        if self.threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(self.threads, thread_name_prefix="curate-decode")
        b0 = hi = 0  # next batch start; first row not yet resolved
        try:
            samples = iter_samples(job.shard.tar, errors=tar_errors) if job.shard.tar.exists() else ()
            for s in samples:
                for i in by_key.get(s.key, ()):
                    if i < b0:
                        continue  # duplicate key after its batch was emitted: keep the first
                    images.pop(i, None)
                    errors.pop(i, None)
                    if s.error:
                        errors[i] = s.error
                    elif s.uid is not None and s.uid != job.uids[i]:
                        errors[i] = f"uid mismatch: metadata has {job.uids[i]}, tar json has {s.uid}"
                    else:
                        images[i] = s.image
                while hi < n and (hi in images or hi in errors):
                    hi += 1
                while hi - b0 >= bs:
                    yield self._batch(job, b0, n, images, errors, pool)
                    b0 += bs
            if not job.shard.tar.exists():
                why = f"shard tar {job.shard.tar.name} is missing"
            else:
                why = tar_errors[0] if tar_errors else f"key not found in {job.shard.tar.name}"
            for i in range(b0, n):
                if i not in images and i not in errors:
                    errors[i] = why
            while b0 < n or (n == 0 and b0 == 0):
                yield self._batch(job, b0, n, images, errors, pool)
                b0 += bs
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)

    def _prepare(self, data: bytes):
        """bytes -> (tensor, None) or (None, reason); PIL and torchvision release the GIL while working."""
        try:
            return self.preprocess(decode_image(data, self.max_pixels, self.draft_size)), None
        except ImageDecodeError as e:
            return None, str(e)
        except Exception as e:  # a transform failing on a decodable but odd image
            return None, f"preprocess failed: {type(e).__name__}: {e}"

    def _batch(self, job: ShardJob, b0: int, n: int, images, errors, pool) -> dict[str, Any]:
        import torch

        rows = list(range(b0, min(b0 + self.batch_size, n)))
        tensors, img_rows = [], []
        errs: dict[int, str] = {i: errors.pop(i) for i in rows if i in errors}
        todo = [i for i in rows if i not in errs]
        done = (pool.map if pool is not None else map)(self._prepare, [images.pop(i) for i in todo])
        for i, (t, why) in zip(todo, done):
            if t is None:
                errs[i] = why
            else:
                tensors.append(t)
                img_rows.append(i)
        return {
            "shard": job.shard.index,
            "rows": rows,
            "img_rows": img_rows,
            "images": torch.stack(tensors) if tensors else None,
            "tokens": self.tokenizer([job.texts[i] for i in rows]) if rows else None,
            "errors": errs,
            "final": b0 + self.batch_size >= n,
        }


def _iterable_dataset(batches: ShardBatches):
    import torch

    class _DS(torch.utils.data.IterableDataset):
        def __iter__(self):
            from curate.core.loader_workers import in_worker, share_tensors

            worker = in_worker()
            for b in batches:
                yield share_tensors(b) if worker else b  # an error here reaches the main process

    return _DS()


def _prefetch(iterable, depth: int) -> Iterator:
    """Run `iterable` in a background thread, `depth` items ahead, re-raising its errors here.

    Hand-written because torch's DataLoader only offers processes, and a queue + thread is all
    that is needed to overlap decoding with the forward pass inside one process.
    """
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def produce():
        try:
            for item in iterable:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(end)
        except BaseException as e:  # handed to the consumer, which re-raises it
            q.put(e)

    t = threading.Thread(target=produce, name="curate-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)  # decode workers must not compete with the model for all cores


# ----------------------------------------------------------------------------------------------
# Model side


# The encode path (normalisation, autocast on CUDA, text trimmed to the batch's longest caption) is the one
# in curate.clip.models, shared with the filter's target images and evaluate; re-exported under its old name.
encode_text_trimmed = models.encode_text_trimmed


class Embedder:
    """Holds one model and embeds whole shards (setup once, then process shards, NeMo-style)."""

    def __init__(self, cfg: EmbedConfig, mid: str):
        self.cfg, self.mid = cfg, mid
        self.loaded = None
        self.draft: int | None = None  # the draft side the last run decoded with (None: full decode)

    def setup(self) -> None:
        import torch

        from curate.clip.models import load_model

        self.loaded = load_model(self.cfg.model, self.cfg.pretrained, self.cfg.device)
        if self.loaded.model_id != self.mid:
            raise CurateError(f"{self.cfg.pretrained}: weights changed while running (model id {self.mid} -> "
                              f"{self.loaded.model_id}); rerun")
        self.device = self.loaded.device
        model = self.loaded.model
        if self.device == "cpu":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        with torch.inference_mode():  # output width, needed even for a shard with no rows
            self.dims = int(model.encode_text(self.loaded.tokenizer([""]).to(self.device)).shape[-1])

    def _forward(self, batch: dict[str, Any]) -> tuple[Any, Any]:
        import torch

        img_emb = None
        if batch["images"] is not None:
            x = batch["images"].to(self.device, non_blocking=True)
            if self.device == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            img_emb = models.encode_images(self.model, x).cpu().numpy()
        txt_emb = models.encode_texts(self.model, batch["tokens"].to(self.device))
        return img_emb, txt_emb.cpu().numpy()

    def run(self, jobs: list[ShardJob], on_shard_done=None, progress=None) -> list[dict]:
        """Embed every shard of `jobs`; write each file as soon as its last batch is done."""
        import numpy as np
        import torch

        if self.loaded is None:
            self.setup()
        gpu = self.device.startswith("cuda")
        mode = self.cfg.decode if self.cfg.decode != "auto" else "process"
        nw = self.cfg.loader_workers
        if nw is None:
            nw = 4 if gpu else (1 if mode == "process" else 2)
        draft = self.draft = draft_side(self.loaded.preprocess) if self.cfg.jpeg_draft else None
        batches = ShardBatches(jobs, self.loaded.preprocess, self.loaded.tokenizer, self.cfg.batch_size,
                               self.cfg.max_pixels, threads=nw if mode == "thread" else 0, draft_size=draft)
        if mode == "process" and nw > 0:
            loader = torch.utils.data.DataLoader(
                _iterable_dataset(batches), batch_size=None, num_workers=min(nw, len(jobs)),
                worker_init_fn=_worker_init, prefetch_factor=2, pin_memory=gpu,
            )
        elif mode == "thread":
            loader = _prefetch(batches, depth=2)
        else:
            loader = batches
        threads = self.cfg.model_threads
        old_threads = torch.get_num_threads()
        if threads is None and not gpu and mode == "process" and nw > 0:
            # torch's intra-op threads (one per core, or what Ray / OMP_NUM_THREADS allows) minus the loader
            # processes, so the model and the decoders do not contend for the same cores
            threads = max(1, old_threads - min(nw, len(jobs)))
        if threads:
            torch.set_num_threads(threads)
        try:
            return self._run(loader, jobs, on_shard_done, progress)
        finally:
            torch.set_num_threads(old_threads)

    def _run(self, loader, jobs: list[ShardJob], on_shard_done, progress) -> list[dict]:
        import numpy as np

        by_index = {j.shard.index: j for j in jobs}
        state: dict[int, dict] = {}
        results = []
        for batch in loader:
            j = by_index[batch["shard"]]
            st = state.get(j.shard.index)
            if st is None:
                st = state[j.shard.index] = {"img": None, "txt": None, "errors": {}, "t0": time.time()}
            img_emb, txt_emb = self._forward(batch) if batch["rows"] else (None, None)
            n = len(j.uids)
            if txt_emb is not None and st["txt"] is None:
                d = txt_emb.shape[1]
                st["img"] = np.full((n, d), np.nan, dtype=np.float32)
                st["txt"] = np.zeros((n, d), dtype=np.float32)
            if batch["rows"]:
                st["txt"][batch["rows"]] = txt_emb
            if img_emb is not None:
                st["img"][batch["img_rows"]] = img_emb
            st["errors"].update(batch["errors"])
            if progress is not None:
                progress.update(len(batch["rows"]))
            if batch["final"]:
                res = self._write(j, st)
                results.append(res)
                del state[j.shard.index]
                if on_shard_done is not None:
                    on_shard_done(res)
        return results

    def _write(self, job: ShardJob, st: dict) -> dict:
        import numpy as np
        import pyarrow as pa

        from curate.core.atomic import write_parquet

        n = len(job.uids)
        d = self.dims
        img = st["img"] if st["img"] is not None else np.zeros((0, d), np.float32)
        txt = st["txt"] if st["txt"] is not None else np.zeros((0, d), np.float32)
        ok = np.zeros(n, dtype=bool)
        if n:
            ok = ~np.isnan(img).any(axis=1)
        score = np.where(ok, (np.nan_to_num(img) * txt).sum(axis=1), np.nan).astype(np.float32) if n \
            else np.zeros(0, np.float32)
        vtype = pa.list_(pa.float16(), d)
        flat_img = pa.array(np.nan_to_num(img).astype(np.float16).reshape(-1), type=pa.float16())
        image_col = pa.FixedSizeListArray.from_arrays(flat_img, d, mask=pa.array(~ok))
        text_col = pa.FixedSizeListArray.from_arrays(pa.array(txt.astype(np.float16).reshape(-1)), d)
        errors = [st["errors"].get(i) for i in range(n)]
        table = pa.table(
            {
                "uid": pa.array(job.uids, pa.string()),
                "image_emb": image_col.cast(vtype),
                "text_emb": text_col.cast(vtype),
                "clip_score": pa.array(score, pa.float32(), mask=~ok),
                "error": pa.array(errors, pa.string()),
            }
        )
        md = {
            "curate.format": FORMAT_VERSION,
            "curate.model_id": self.mid,
            "curate.arch": self.cfg.model,
            "curate.pretrained": self.cfg.pretrained or "",
            "curate.dims": str(d),
            "curate.shard": str(job.shard.index),
            "curate.decode": f"jpeg-draft-{self.draft}" if self.draft else "full",
            **shard_fingerprint(job.shard),
        }
        table = table.replace_schema_metadata(md)
        path = output_path(self.cfg.pool, self.mid, job.shard)
        write_parquet(path, table)
        return {"shard": job.shard.index, "rows": n, "embedded": int(ok.sum()), "errors": int(n - ok.sum()),
                "path": str(path), "seconds": round(time.time() - st["t0"], 3)}


# ----------------------------------------------------------------------------------------------
# Ray: one actor per GPU (or per `cpus_per_worker` CPUs) holds the model and pulls shards


def _run_ray(cfg: EmbedConfig, mid: str, jobs: list[ShardJob], progress) -> list[dict]:
    """Hand each actor one shard at a time (curate.core.parallel.actor_map). An actor whose process or node dies
    mid-shard has written nothing of that shard (files are atomic), so its shard goes back to the queue for the
    other actors; the dead actor is not replaced, since its node may be gone and an actor waiting for resources
    that never come would hang the run. Only when every actor has died is it a MachineFailure (naming the lost
    nodes); a rerun then resumes at the unfinished shards."""
    from curate.core.errors import MachineFailure
    from curate.core.parallel import Resources, actor_map, ray_session

    with ray_session(cfg.ray_address) as ray:
        use_gpu = cfg.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0
        res = Resources(cpus=1, gpus=1) if use_gpu else Resources(cpus=cfg.cpus_per_worker)
        actor_cfg = EmbedConfig(**{**asdict(cfg), "device": "cuda" if use_gpu else cfg.device, "progress": False})
        n_actors = min(cfg.workers, len(jobs))

        def lost(job, what: str, left: int) -> None:
            click.echo(f"embed: the actor embedding shard {job.shard.index} died: {what}; the shard goes to "
                       f"another actor ({left} left)", err=True)

        def lost_all(left: list, failure: MachineFailure) -> MachineFailure:
            return MachineFailure(f"every embed actor ({n_actors}) died; shard(s) {sorted(j.shard.index for j in left)} "
                                  f"are not embedded. Last failure: {failure.message}")

        results = []
        for _, r in actor_map(_EmbedActor, (actor_cfg, mid), jobs, workers=cfg.workers, resources=res,
                              label=lambda j: f"embedding shard {j.shard.index}", on_lost=lost, lost_all=lost_all):
            results.extend(r)
            if progress is not None:
                progress.update(sum(x["rows"] for x in r))
        return results


class _EmbedActor(RayActor):
    """A Ray actor: loads the model once in its constructor, then embeds the shards it is handed."""

    def __init__(self, cfg: EmbedConfig, mid: str):
        import torch

        if cfg.device == "cpu" or not torch.cuda.is_available():
            torch.set_num_threads(max(1, cfg.cpus_per_worker))
        self.embedder = Embedder(cfg, mid)
        self.embedder.setup()

    def run(self, job: ShardJob) -> list[dict]:
        return self.embedder.run([job])


# ----------------------------------------------------------------------------------------------
# The stage


def validate_model_args(arch: str, pretrained: str | None) -> str:
    """Fail early, naming the problem, and return the model id (hashing the checkpoint if a path)."""
    from curate.clip.models import known_architectures, model_id

    if arch not in known_architectures():
        raise CurateError(f"unknown model architecture {arch!r}; known: curate-tiny, curate-debug, ViT-B-32, "
                          f"ViT-L-14, ... (`python -c 'import open_clip; print(open_clip.list_models())'`)")
    if pretrained and (os.sep in pretrained or os.path.exists(pretrained)
                       or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        if not os.path.isfile(pretrained):
            raise CurateError(f"--pretrained {pretrained}: checkpoint file not found")
        if not os.access(pretrained, os.R_OK):
            raise CurateError(f"--pretrained {pretrained}: checkpoint file is not readable")
    return model_id(arch, pretrained)


def embed(cfg: EmbedConfig) -> dict[str, Any]:
    """Embed every not-yet-embedded shard of `cfg.pool`; return a summary (counts reconcile with the pool)."""
    from tqdm import tqdm

    from curate.core.atomic import cleanup_temp_files

    t0 = time.time()
    source = Pool.open(cfg.pool)  # a CurateError naming what is missing when it is not a pool
    pool = source.path
    mid = validate_model_args(cfg.model, cfg.pretrained)
    shards = source.shards()
    if cfg.shards is not None:
        wanted = set(cfg.shards)
        missing = wanted - {s.index for s in shards}
        if missing:
            raise CurateError(f"{pool}: no shard(s) {sorted(missing)}")
        shards = [s for s in shards if s.index in wanted]
    out_dir = pool / "embeddings" / mid
    if out_dir.exists():
        cleanup_temp_files(out_dir)  # leftovers of a killed run
    pending = [s for s in shards if not is_up_to_date(output_path(pool, mid, s), mid, s)]
    counts = {"shards": len(shards), "skipped": len(shards) - len(pending), "written": 0, "rows": 0, "embedded": 0,
              "errors": 0}
    summary = StageSummary("embed", not pending, 0.0, counts=counts, outputs={"out_dir": str(out_dir)},
                           fields={"model_id": mid})
    if not pending:
        summary.seconds = time.time() - t0
        return summary.as_dict()
    jobs = load_jobs(pending)
    total = sum(len(j.uids) for j in jobs)
    bar = tqdm(total=total, unit="img", desc=f"embed {mid}", disable=not cfg.progress or None, leave=False)
    try:
        if cfg.workers > 1 or cfg.ray_address:
            results = _run_ray(cfg, mid, jobs, bar)
        else:
            results = Embedder(cfg, mid).run(jobs, progress=bar)
    finally:
        bar.close()
    for r in results:
        counts["written"] += 1
        counts["rows"] += r["rows"]
        counts["embedded"] += r["embedded"]
        counts["errors"] += r["errors"]
    summary.seconds = round(time.time() - t0, 3)
    summary.fields["images_per_s"] = round(counts["rows"] / max(summary.seconds, 1e-9), 2)
    return summary.as_dict()


@click.command("embed")
@click.option("--pool", "pool", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="POOL directory (shards/ and metadata/ as written by `curate pool download`).")
@click.option("--model", default="ViT-B-32", show_default=True,
              help="open_clip architecture, or curate-tiny / curate-debug for CPU-sized models.")
@click.option("--pretrained", default=None,
              help="Weights: a local checkpoint file (offline) or an open_clip tag such as 'openai' (needs the "
                   "internet). Omit for random init (only useful for speed tests). Part of the model id.")
@click.option("--batch-size", default=256, show_default=True, type=int, help="Images per forward pass.")
@click.option("--workers", default=1, show_default=True, type=int,
              help="Model-holding processes. >1 runs Ray actors (one per GPU, or per --cpus-per-worker CPUs), "
                   "each loading the model once and pulling whole shards.")
@click.option("--decode", default="auto", show_default=True, type=click.Choice(["auto", "thread", "process", "inline"]),
              help="Where images are decoded while the model runs: DataLoader worker processes (auto), a "
                   "thread pool, or inline (no overlap).")
@click.option("--loader-workers", default=None, type=int,
              help="Decode processes (or threads) per model process [default: 1 process on CPU, 4 on GPU, "
                   "2 threads].")
@click.option("--full-decode", is_flag=True,
              help="Decode every JPEG at full size (default: at reduced scale where the model's preprocessing "
                   "shrinks it anyway, which is most of the CPU cost; see perf/RESULTS.md).")
@click.option("--cpus-per-worker", default=2, show_default=True, type=int, help="CPUs per Ray actor (CPU runs).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="auto uses CUDA when available.")
@click.option("--ray-address", default=None, help="Join an existing Ray cluster (e.g. 'auto' or 'ray://host:10001').")
@click.option("--shard", "shards", multiple=True, type=int, help="Only these shard numbers (repeatable).")
def embed_cmd(pool, model, pretrained, batch_size, workers, decode, loader_workers, full_decode, cpus_per_worker,
              device, ray_address, shards):
    """Compute open_clip image and text embeddings and CLIP scores for every successful pool row.

    Writes POOL/embeddings/<model-id>/{shard}.parquet (uid, image_emb, text_emb, clip_score, error),
    one file per shard, atomically. The model id is the architecture plus a hash of the weights, so
    new weights never overwrite old embeddings. Undecodable images get null embeddings and the
    reason in `error`. Finished shards are skipped, so a killed run resumes where it stopped and a
    rerun with nothing to do says "already up to date".
    """
    import sys

    cfg = EmbedConfig(pool=pool, model=model, pretrained=pretrained, batch_size=batch_size, workers=workers,
                      loader_workers=loader_workers, decode=decode, jpeg_draft=not full_decode, device=device,
                      ray_address=ray_address,
                      cpus_per_worker=cpus_per_worker, shards=list(shards) or None, progress=sys.stderr.isatty())
    s = embed(cfg)
    if s["up_to_date"]:
        click.echo(f"embeddings {s['model_id']}: already up to date ({s['shards']} shards) in {s['out_dir']}")
        return
    click.echo(
        f"embeddings {s['model_id']}: wrote {s['written']} shard(s), skipped {s['skipped']} up to date; "
        f"{s['rows']} rows = {s['embedded']} embedded + {s['errors']} with errors "
        f"({s['images_per_s']} rows/s) -> {s['out_dir']}"
    )
