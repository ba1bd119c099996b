"""``image_based``: DataComp's image-based baseline: keep pool images in clusters that hold target images.

DataComp (``baselines/image_based_clustering.py`` and ``apply_filter.py``): k-means over the pool's
image embeddings, assign every ImageNet-1k training image embedding to its nearest centroid, keep
the pool samples whose nearest centroid is one of those, after a light caption filter (English,
> 1 word, > 5 characters). Here the clustering is faiss k-means (seeded from the recipe seed,
spherical since embeddings are L2-normalised, trained on at most `max_train_points` rows sampled
with that seed), and the target set is any folder of images (e.g. a local evaluation set's
training split), embedded by the runner with the same model as the pool embeddings. `target` may
also be a ``.npy`` file of (n, d) target embeddings. A relative path is read from the recipe's
folder (`filters.common.resolve_path`), and a missing one is a recipe error before any work starts.

The score is the rank of a row's cluster among target clusters by how many targets it holds
(0 = most); rows in non-target clusters and rows without an embedding are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from filters.base import Batch, Filter, StepResult, register
from filters.common import EmbeddingParams, char_counts, column, language_gate, language_model, param_path, word_counts

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@register
class ImageBasedFilter(Filter):
    """Keep rows whose image falls in a k-means cluster that contains target images."""

    name = "image_based"
    scope = "pool"
    columns = ("text",)
    embeddings = ("image",)

    @dataclass
    class Params(EmbeddingParams):
        # folder of target images (recursive) or .npy of target embeddings
        target: str = field(metadata={"path": True})
        n_clusters: int = field(default=1024, metadata={"min": 2})
        max_train_points: int = field(default=1_000_000, metadata={"min": 100})
        niter: int = field(default=20, metadata={"min": 1})
        caption_filter: bool = True  # DataComp: English, > 1 word, > 5 characters before clustering
        max_target_images: int = field(default=100_000, metadata={"min": 1})

    def _resolve(self, context) -> Path:
        from curate.core.errors import CurateError

        p = param_path(self.params, "target", context)
        if not p.exists():
            raise CurateError(f"image_based target {self.params.target}: no such folder or .npy file "
                              f"(looked for {p}; a relative path is read from the recipe's folder)")
        return p

    def setup(self, context) -> None:
        from curate.core.errors import CurateError

        self.seed = int(context.get("seed", 0))
        p = self._resolve(context)
        if p.is_file() and p.suffix == ".npy":
            t = np.load(p, allow_pickle=False).astype(np.float32)
        else:
            files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not files:
                raise CurateError(f"image_based target {p}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
            files = files[: self.params.max_target_images]
            embed = context.get("embed_image_paths")
            if embed is None:
                raise CurateError("image_based: the runner gave no image embedder for the target images")
            t = np.asarray(embed([str(f) for f in files]), dtype=np.float32)
        if t.ndim != 2 or len(t) == 0:
            raise CurateError(f"image_based target {p}: expected (n, d) embeddings, got shape {t.shape}")
        self.targets = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
        if self.params.caption_filter:
            language_model()

    def apply(self, batch: Batch) -> StepResult:
        import faiss

        from curate.core.errors import CurateError

        p = self.params
        emb = batch.image_emb
        n = len(batch)
        reason = np.full(n, None, dtype=object)
        score = np.full(n, np.nan)
        if n == 0:
            return StepResult(keep=np.zeros(0, bool), score=score, reason=reason)
        valid = ~np.isnan(emb).any(axis=1) if emb.shape[1] else np.zeros(n, bool)
        reason[~valid] = "no image embedding"
        if emb.shape[1] != self.targets.shape[1]:
            raise CurateError(f"image_based: target embeddings have {self.targets.shape[1]} dims, pool embeddings "
                              f"{emb.shape[1]}: embed the targets with the pool's model")
        cand = valid.copy()
        if p.caption_filter:
            text = column(batch.table, "text")
            short = cand & ((word_counts(text) <= 1) | (char_counts(text) <= 5))
            reason[short] = "caption too short"
            cand &= ~short
            cand = language_gate(text, cand, reason)
        x = np.ascontiguousarray(emb[valid], dtype=np.float32)
        k = int(min(p.n_clusters, max(1, len(x))))
        rng = np.random.default_rng(self.seed)
        train = x if len(x) <= p.max_train_points else x[np.sort(rng.choice(len(x), p.max_train_points, replace=False))]
        km = faiss.Kmeans(x.shape[1], k, niter=p.niter, seed=self.seed, spherical=True, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=max(256, len(train) // k + 1))
        km.train(train)
        _, pool_assign = km.index.search(x, 1)
        _, tgt_assign = km.index.search(np.ascontiguousarray(self.targets), 1)
        counts = np.bincount(tgt_assign[:, 0], minlength=k)
        target_clusters = counts > 0
        # rank of each target cluster by how many targets it holds (0 = most), ties by cluster id
        order = np.lexsort((np.arange(k), -counts))
        rank = np.empty(k)
        rank[order] = np.arange(k)
        assign = np.full(n, -1)
        assign[valid] = pool_assign[:, 0]
        in_target = np.zeros(n, bool)
        in_target[valid] = target_clusters[assign[valid]]
        score[valid] = rank[assign[valid]]
        outside = cand & ~in_target
        reason[outside] = [f"cluster {c} holds no target image" for c in assign[outside]]
        keep = cand & in_target
        return StepResult(keep=keep, score=score, reason=reason, threshold=None)
