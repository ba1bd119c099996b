"""``decontaminate``: drop pool samples that are copies or near copies of evaluation images.

Recipe: ``decontaminate: {evalsets: PATH, threshold: 0.9}``

DataComp removed near-duplicates of its evaluation images from CommonPool so that zero-shot scores
measure generalisation, not memorisation. This step does the same for any evaluation data:

* PATH is searched recursively for images (``.png .jpg .jpeg .webp .bmp .gif .tif .tiff``):
  plain folders (the offline suite's ``<task>/images/*.png``) and DataComp / clip_benchmark
  webdataset shards (``<task>/test/*.tar``), whose image members are extracted once into the
  runner's cache under generated names (a member's name never becomes a path: no traversal), with
  a per-member size cap.
* Exact copies: a pool row whose ``sha256`` equals an evaluation file's sha256 is dropped.
* Near copies: evaluation images are embedded with the step's model through the runner's
  ``embed_image_paths`` (cached per model and file set), and a pool row whose image embedding has
  cosine >= ``threshold`` with any of them is dropped (FAISS search, exact for evaluation-set sizes).

The reason names the evaluation image (path relative to PATH, ``shard.tar:member`` for shards);
the score is the row's highest cosine to any evaluation image. A relative PATH is read from the
recipe's folder (`filters.common.resolve_path`), and a missing one is a recipe error before any work starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.lib import faiss_index
from curate.core.hashing import sha256_file
from curate.core.atomic import atomic_path, write_bytes
from curate.core.errors import CurateError
from curate.core.images import MAX_IMAGE_PIXELS as MAX_PIXELS, ImageDecodeError, decode_image_file
from curate.core.tar_reader import MAX_MEMBER_BYTES, iter_members
from filters.base import Batch, Filter, StepResult, register
from filters.common import EmbeddingParams, column, normalise, param_path

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class EvalImage:
    path: Path  # a real file on disk (extracted for tar members)
    label: str  # what the ledger shows: relative path, or "shard.tar:member"


def _extract_tar(tar_path: Path, root: Path, cache: Path) -> list[EvalImage]:
    """Image members of a webdataset shard, extracted once into `cache` under generated names."""
    st = tar_path.stat()
    key = hashlib.sha256(f"{tar_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    dest = cache / "decontaminate" / "tars" / key
    index_file = dest / "index.json"
    rel = str(tar_path.relative_to(root))
    if index_file.is_file():
        entries = json.loads(index_file.read_text())
    else:
        entries = []
        # The project's one tar reader with its member cap (evaluation members are small: all are read, in
        # one streamed pass). Names are not checked: a member's name is only ever a label here, and an
        # evaluation image under a hostile name is still one whose copies must go.
        try:
            for i, m in enumerate(iter_members(tar_path, check_names=False)):
                ext = os.path.splitext(m.name)[1].lower()
                if m.is_dir or m.problem or m.data is None or ext not in IMAGE_EXTS:
                    continue
                # Our own file name, never the member's: a hostile "../../x" stays a label.
                name = f"{i:08d}{ext}"
                write_bytes(dest / name, m.data)
                entries.append([name, m.name])
        except CurateError as e:
            raise CurateError(f"decontaminate: cannot read evaluation shard {tar_path}: {e}") from None
        with atomic_path(index_file) as tmp:
            tmp.write_text(json.dumps(entries))
    return [EvalImage(dest / name, f"{rel}:{member}") for name, member in entries]


def collect_eval_images(root: Path, cache: Path) -> list[EvalImage]:
    """Every evaluation image under `root` (files and shard members), in a stable order."""
    if root.is_file():
        files = [root]
        root = root.parent
    else:
        files = sorted(p for p in root.rglob("*") if p.is_file())
    out: list[EvalImage] = []
    for f in files:
        suffix = f.suffix.lower()
        if suffix in IMAGE_EXTS:
            out.append(EvalImage(f, str(f.relative_to(root))))
        elif suffix == ".tar":
            out.extend(_extract_tar(f, root, cache))
    return out


def _readable(path: Path) -> bool:
    """Whether the image decodes under the project's pixel cap (the decoder the embedder uses on it next)."""
    try:
        decode_image_file(path, MAX_PIXELS, max_bytes=MAX_MEMBER_BYTES)
        return True
    except ImageDecodeError:
        return False


@register
class DecontaminateFilter(Filter):
    """Remove pool rows that are exact or near copies of evaluation-set images."""

    name = "decontaminate"
    scope = "pool"
    columns = ("sha256",)
    embeddings = ("image",)

    @dataclass
    class Params(EmbeddingParams):
        evalsets: str = field(metadata={"path": True})
        threshold: float = field(default=0.9, metadata={"min": -1.0, "max": 1.0})

    def __init__(self, params):
        super().__init__(params)
        self.images: list[EvalImage] = []
        self.skipped: list[str] = []
        self.emb: np.ndarray | None = None
        self.sha_to_label: dict[str, str] = {}

    def setup(self, context) -> None:
        root = param_path(self.params, "evalsets", context)
        if not root.exists():
            raise CurateError(f"decontaminate: evalsets: {self.params.evalsets} not found (looked for {root})")
        cache = Path(context.get("cache_dir") or Path.home() / ".cache" / "curate")
        found = collect_eval_images(root, cache)
        readable = [_readable(im.path) for im in found]
        self.images = [im for im, ok in zip(found, readable) if ok]
        self.skipped = [im.label for im, ok in zip(found, readable) if not ok]
        if self.skipped:
            log.warning("decontaminate: %d unreadable evaluation images skipped (first: %s)",
                        len(self.skipped), self.skipped[0])
        if not self.images:
            raise CurateError(f"decontaminate: evalsets: no readable images under {root} "
                              f"(looked for {', '.join(IMAGE_EXTS)} files and .tar shards)")
        shas = [sha256_file(im.path) for im in self.images]
        self.sha_to_label = {}
        for s, im in zip(shas, self.images):
            self.sha_to_label.setdefault(s, im.label)
        embed = context.get("embed_image_paths")
        if embed is None:
            raise CurateError("decontaminate: needs an image model to embed the evaluation images "
                              "(set model:/pretrained: in the recipe or step)")
        # Cache the embeddings per model and exact file contents: re-runs do not re-embed.
        key = hashlib.sha256(json.dumps([context.get("model_id"), shas]).encode()).hexdigest()[:24]
        cached = cache / "decontaminate" / f"emb-{key}.npy"
        if cached.is_file():
            emb = np.load(cached)
        else:
            emb = np.asarray(embed([str(im.path) for im in self.images]), dtype=np.float32)
            if emb.shape[0] != len(self.images):
                raise RuntimeError(f"embed_image_paths returned {emb.shape[0]} rows for {len(self.images)} images")
            with atomic_path(cached, suffix=".npy") as tmp:
                np.save(tmp, emb)
        self.emb = emb

    def apply(self, batch: Batch) -> StepResult:
        p = self.params
        n = len(batch)
        if self.emb is None:
            raise RuntimeError("decontaminate: setup() was not called")
        keep = np.ones(n, dtype=bool)
        score = np.full(n, np.nan)
        reason: list[str | None] = [None] * n
        ev, ev_ok = normalise(self.emb)
        ev_idx = np.flatnonzero(ev_ok)
        if batch.image_emb is not None and len(ev_idx) and n:
            x, ok = normalise(batch.image_emb)
            rows = np.flatnonzero(ok)
            if len(rows):
                faiss_index.warn_if_collapsed(x[rows], p.threshold, "decontaminate")
                index = faiss_index.build_index(ev[ev_idx], faiss_index.choose_index(len(ev_idx), "flat"))
                sims, ids = faiss_index.knn(index, x[rows], 1, desc="eval near-duplicates")
                score[rows] = sims[:, 0]
                hit = sims[:, 0] >= p.threshold
                for r, j, s in zip(rows[hit].tolist(), ids[hit, 0].tolist(), sims[hit, 0].tolist()):
                    keep[r] = False
                    reason[r] = f"near duplicate of eval image {self.images[ev_idx[j]].label} (cosine {s:.3f})"
        sha = column(batch.table, "sha256")
        if sha is not None and self.sha_to_label:
            values = pa.array(sorted(self.sha_to_label))
            exact = pc.is_in(sha.cast(pa.string()), value_set=values).to_numpy(zero_copy_only=False)
            shas = sha.to_pylist()
            for r in np.flatnonzero(exact).tolist():
                keep[r] = False
                score[r] = 1.0
                reason[r] = f"exact copy of eval image {self.sha_to_label[shas[r]]} (same sha256)"
        return StepResult(keep=keep, score=score, reason=reason, threshold=p.threshold)
