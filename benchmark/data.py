"""Training data: resampled webdataset shards, decoded and batched in worker processes, deterministically.

As in DataComp (open_clip's `--dataset-resampled`), shards are drawn with replacement, so the number
of samples seen is fixed by the scale whatever the subset size. Unlike open_clip's loader, the stream
is a pure function of (seed, segment, rank, worker): training is cut into segments that end at the
checkpoints, each segment builds a fresh loader seeded by its index, and torch's DataLoader takes
batches from its workers in a fixed round-robin order. A run resumed from checkpoint k therefore
sees exactly the batches an uninterrupted run sees after checkpoint k, and reaches the same weights.

webdataset does the tar reading and sample grouping (`tarfile_to_samples`) and the shuffle buffer;
images are decoded with curate.pool.io.decode_image (pixel cap, corrupt images skipped and counted)
and transformed with open_clip's training transform; captions are tokenised per batch.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from curate.core.errors import CurateError

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def find_shards(data: str | Path) -> list[str]:
    """The webdataset shards of a SUBSET (SUBSET/shards/*.tar) or of a folder of tars."""
    data = Path(data)
    if not data.exists():
        raise CurateError(f"--data {data}: no such folder")
    for folder in (data / "shards", data):
        tars = sorted(str(p) for p in folder.glob("*.tar") if not p.name.startswith("."))
        if tars:
            return tars
    raise CurateError(f"--data {data}: no webdataset shards (*.tar) in it or in its shards/; "
                      f"run `curate reshard --subset {data}` first")


def stream_seed(*parts: int) -> int:
    """A 32-bit seed derived from several integers (numpy SeedSequence mixes them well)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


@dataclass
class StreamConfig:
    shards: list[str]
    batch_size: int  # per process
    n_batches: int  # batches this loader yields (one training segment)
    seed: int
    segment: int
    rank: int = 0
    shuffle_buffer: int = 5000


class ResampledBatches:
    """Iterable of (images, tokens) batches; a torch IterableDataset (subclassed lazily, see `make_loader`)."""

    def __init__(self, cfg: StreamConfig, transform: Callable, tokenizer: Callable):
        self.cfg = cfg
        self.transform = transform
        self.tokenizer = tokenizer
        self.skipped = 0

    def _samples(self, rng: random.Random) -> Iterator[tuple]:
        import webdataset as wds

        from curate.pool.io import ImageDecodeError, decode_image

        def urls():
            while True:  # resampled: shards drawn with replacement, forever
                yield {"url": rng.choice(self.cfg.shards)}

        stages = [
            urls,
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
            wds.shuffle(self.cfg.shuffle_buffer, max(1, self.cfg.shuffle_buffer // 5), rng=rng),
        ]
        for sample in wds.DataPipeline(*stages):
            img_bytes = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
            txt = sample.get("txt")
            if img_bytes is None or txt is None:
                self.skipped += 1
                continue
            try:
                img = decode_image(img_bytes)
            except ImageDecodeError:
                self.skipped += 1
                continue
            yield self.transform(img), txt.decode("utf-8", "replace")

    def __iter__(self):
        import torch
        from torch.utils.data import get_worker_info

        from curate.core.loader_workers import share_tensors

        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        seed = stream_seed(self.cfg.seed, self.cfg.segment, self.cfg.rank, wid)
        torch.manual_seed(seed)  # the random crop of the train transform draws from torch's RNG
        rng = random.Random(seed)
        # the DataLoader takes batches round-robin from workers: worker w serves batches w, w+nw, ...
        mine = len(range(wid, self.cfg.n_batches, nw))
        if mine == 0:
            return
        bs = self.cfg.batch_size
        imgs, txts, produced = [], [], 0
        for img, txt in self._samples(rng):
            imgs.append(img)
            txts.append(txt)
            if len(imgs) == bs:
                batch = torch.stack(imgs), self.tokenizer(txts)
                yield share_tensors(batch) if info is not None else batch  # see curate/core/loader_workers.py
                imgs, txts = [], []
                produced += 1
                if produced == mine:
                    return


def make_loader(cfg: StreamConfig, transform: Callable, tokenizer: Callable, workers: int):
    """A DataLoader yielding exactly `cfg.n_batches` batches, deterministically for a given cfg and workers."""
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    class _Dataset(ResampledBatches, IterableDataset):
        pass

    ds = _Dataset(cfg, transform, tokenizer)
    workers = max(0, min(workers, cfg.n_batches))
    return DataLoader(
        ds,
        batch_size=None,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(stream_seed(cfg.seed, cfg.segment, cfg.rank, 999)),
    )
