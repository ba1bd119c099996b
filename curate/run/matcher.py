"""The pool matcher: scorer v2's ``match_score``, an image-text matcher trained on the pool's own pairs.

Why it exists. The bootstrapped tiny CLIP (curate/run/scorer.py) sees about one epoch of the pool inside the
scorer's time budget, and its 128-d vectors are the ceiling of everything built on them: the ITM head on them
(curate/run/itm.py) separates caption swaps from clean rows at ROC AUC ~0.76, and neighbourhood features from
the same vectors add little (perf/RESULTS.md, "Scorer v2 on the large pool"). The matcher is cheap enough to
see the pool many times, and it adds two inputs the CLIP squeezed out:

  image  the bootstrapped CLIP's frozen image vector, plus a 16 x 16 grey and an 8 x 8 colour thumbnail of the
         image (decoded once from the shards; icons are simple shapes, and at this size their outline and
         palette survive), through a small MLP;
  text   the frozen CLIP text vector, plus a learned bag of the caption's hashed word unigrams, bigrams and
         character trigrams (scikit-learn's HashingVectorizer; an icon name is a few words, often compounds
         such as "systemfolder", so word and sub-word tokens carry it), through a small MLP.

Both towers are trained from scratch on the pool rows *outside the held-out fifth* (the same rows stage 1 of
the bootstrap pretrained on), with the CLIP loss over in-batch negatives: LiT-style (Zhai et al. 2022: lock the
image model, tune the text side) with the image side only partly locked. The pool's rows are noisy positives,
as in BLIP's bootstrapping; the matcher learns what agrees across most of them. ``match_score`` is the cosine of
the two unit vectors, in [-1, 1]: higher = the caption more likely describes the image. It is written beside
``itm_score`` in the scores folder (docs/FORMATS.md "Scores") and the ``score`` filter selects it by name.

Cost on 2 cores at the large pool (107k rows): thumbnails ~20 s, 14 epochs ~90 s, scoring seconds; the
hyperparameters below were chosen on a development fold (uid-hash fifth 1, never the held-out fifth 0).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from curate.core.errors import CurateError

MATCH_COLUMN = "match_score"
TRAINING = "cross-fitted-4"  # how the scorer trains and applies matchers (curate/run/scorer.py _run_matcher); digested


@dataclass
class MatcherConfig:
    """Hyperparameters of the matcher (fixed defaults; part of its checkpoint and training digest)."""

    dim: int = 128  # output dimension of both towers
    hidden: int = 512
    buckets: int = 1 << 18  # hashed token buckets (half words and word bigrams, half character trigrams)
    thumb_grey: int = 16  # grey thumbnail side (pixels)
    thumb_colour: int = 8  # colour thumbnail side
    thumb_scale: float = 0.1  # standardised thumbnail pixels are scaled by this (the CLIP vector's rows are unit)
    epochs: int = 14
    batch_size: int = 1024
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    use_clip: bool = True  # the frozen bootstrapped CLIP vectors as inputs too (off: pixels and tokens only)

    @property
    def thumb_dims(self) -> int:
        return self.thumb_grey ** 2 + 3 * self.thumb_colour ** 2


# ---------------------------------------------------------------------------------------------- inputs


def _shard_thumbnails(tar: str, grey: int, colour: int) -> tuple[list[str], np.ndarray, list[str]]:
    """(uids, uint8 thumbnails, errors) of one shard, through the pool's one safe sample reader."""
    from PIL import Image

    from curate.core.images import ImageDecodeError, decode_image
    from curate.core.tar_reader import iter_samples

    uids, rows, errors, tar_errors = [], [], [], []
    for s in iter_samples(Path(tar), tar_errors):  # its own list: the reader drops a last sample after a tar error
        if s.uid is None or s.image is None:
            continue
        try:
            im = decode_image(s.image, draft_size=2 * grey)
        except ImageDecodeError as e:
            errors.append(f"{s.uid}: {e}")
            continue
        g = np.asarray(im.resize((grey, grey), Image.BILINEAR).convert("L"), np.uint8).ravel()
        c = np.asarray(im.resize((colour, colour), Image.BILINEAR), np.uint8).ravel()
        uids.append(s.uid)
        rows.append(np.concatenate([g, c]))
    d = grey * grey + 3 * colour * colour
    errors += tar_errors
    return uids, (np.stack(rows) if rows else np.zeros((0, d), np.uint8)), errors


def thumbnails(pool: Path, uids: np.ndarray, cfg: MatcherConfig, workers: int = 2,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, thumb_dims) thumbnails, bool (N,) found) for `uids`, in that order, from POOL/shards/*.tar.
    A row whose image is missing or undecodable is not found (its match_score is left null)."""
    from tqdm import tqdm

    from curate.core.parallel import Backend, pmap

    tars = sorted((Path(pool) / "shards").glob("*.tar"))
    if not tars:
        raise CurateError(f"{pool}: no shards/*.tar to read the images from")
    pos = {u: i for i, u in enumerate(uids)}
    out = np.zeros((len(uids), cfg.thumb_dims), np.uint8)
    found = np.zeros(len(uids), bool)
    backend = Backend.choose(min(workers, len(tars)))
    it = pmap(_shard_thumbnails, [str(t) for t in tars], backend=backend, args=(cfg.thumb_grey, cfg.thumb_colour),
              ordered=False, label=lambda t: f"thumbnails of {Path(t).name}")
    for _, (us, x, _errs) in tqdm(it, total=len(tars), desc="matcher thumbnails", unit="shard", disable=not progress):
        for u, row in zip(us, x):
            i = pos.get(u)
            if i is not None:
                out[i], found[i] = row, True
    return out, found


def token_matrix(texts: list[str], buckets: int):
    """CSR (N, buckets) of hashed caption tokens, each row summing to 1 (a mean bag; empty captions are empty rows):
    word unigrams and bigrams in the first half of the buckets, character trigrams within word boundaries in
    the second, so the two kinds never share a bucket."""
    import scipy.sparse as sp
    from sklearn.feature_extraction.text import HashingVectorizer

    half = buckets // 2
    words = HashingVectorizer(n_features=half, analyzer="word", ngram_range=(1, 2), token_pattern=r"[a-z0-9]+",
                              alternate_sign=False, norm=None, lowercase=True)
    chars = HashingVectorizer(n_features=half, analyzer="char_wb", ngram_range=(3, 3), alternate_sign=False,
                              norm=None, lowercase=True)
    clean = [t or "" for t in texts]
    x = sp.hstack([words.transform(clean), chars.transform(clean)], format="csr").astype(np.float32)
    sums = np.asarray(x.sum(axis=1)).ravel()
    return sp.diags(1.0 / np.where(sums > 0, sums, 1.0)).astype(np.float32) @ x


# ---------------------------------------------------------------------------------------------- model


def make_model(cfg: MatcherConfig, image_in: int, text_clip: int):
    import torch

    class Matcher(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = torch.nn.EmbeddingBag(cfg.buckets, cfg.dim, mode="sum", sparse=True)
            self.text = torch.nn.Sequential(torch.nn.Linear(cfg.dim + text_clip, cfg.hidden), torch.nn.GELU(),
                                            torch.nn.Linear(cfg.hidden, cfg.dim))
            self.image = torch.nn.Sequential(torch.nn.Linear(image_in, cfg.hidden), torch.nn.GELU(),
                                             torch.nn.Linear(cfg.hidden, cfg.hidden), torch.nn.GELU(),
                                             torch.nn.Linear(cfg.hidden, cfg.dim))
            self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

        def encode_text(self, tokens, clip_t):
            idx, off, w = tokens
            return torch.nn.functional.normalize(self.text(torch.cat([self.bag(idx, off, per_sample_weights=w),
                                                                      clip_t], 1)), dim=-1)

        def encode_image(self, x):
            return torch.nn.functional.normalize(self.image(x), dim=-1)

    return Matcher()


def _bags(x, rows: np.ndarray):
    """EmbeddingBag inputs (indices, offsets, weights) of CSR rows `rows`."""
    import torch

    sub = x[rows]
    return (torch.from_numpy(sub.indices.astype(np.int64)), torch.from_numpy(sub.indptr[:-1].astype(np.int64)),
            torch.from_numpy(sub.data.astype(np.float32)))


@dataclass
class Inputs:
    """Everything the matcher reads, aligned with the embeddings' rows."""

    image: np.ndarray  # (N, image_in) float32: [CLIP image vector,] standardised thumbnail
    clip_text: np.ndarray  # (N, d) float32 unit CLIP text vectors; (N, 0) when use_clip is off
    tokens: object  # CSR (N, buckets)
    ok: np.ndarray  # (N,) rows that have both a thumbnail and (when used) CLIP vectors


def inputs(img: np.ndarray, txt: np.ndarray, thumbs: np.ndarray, found: np.ndarray, texts: list[str],
           cfg: MatcherConfig, mean: np.ndarray | None = None, std: np.ndarray | None = None,
           fit_rows: np.ndarray | None = None) -> tuple[Inputs, np.ndarray, np.ndarray]:
    """The model's inputs; thumbnail pixels standardised with (mean, std), fitted on `fit_rows` when not given."""
    from filters.common import normalise

    th = thumbs.astype(np.float32) / 255.0
    if mean is None:
        fit = th[fit_rows] if fit_rows is not None else th[found]
        mean, std = fit.mean(0), fit.std(0) + 1e-3
    th = (th - mean) / std * cfg.thumb_scale
    ok = found.copy()
    if cfg.use_clip:
        i, oki = normalise(img)
        t, okt = normalise(txt)
        ok &= oki & okt
        image = np.concatenate([i, th], 1).astype(np.float32)
    else:
        t = np.zeros((len(th), 0), np.float32)
        image = th.astype(np.float32)
    return Inputs(image, t, token_matrix(texts, cfg.buckets), ok), mean.astype(np.float32), std.astype(np.float32)


def train(inp: Inputs, rows: np.ndarray, cfg: MatcherConfig, progress: bool = False) -> tuple[dict, dict]:
    """Train on `rows` (CLIP loss over in-batch negatives); return (state_dict, stats)."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    model = make_model(cfg, inp.image.shape[1], inp.clip_text.shape[1])
    dense = [p for n, p in model.named_parameters() if not n.startswith("bag.")]
    opt = torch.optim.AdamW(dense, lr=cfg.lr, weight_decay=cfg.weight_decay)
    opt_bag = torch.optim.SparseAdam([model.bag.weight], lr=cfg.lr)  # sparse rows: only the batch's tokens move
    I, T = torch.from_numpy(inp.image), torch.from_numpy(inp.clip_text)
    rows = np.asarray(rows, np.int64)
    bs = max(2, min(cfg.batch_size, len(rows)))
    if len(rows) < 2:
        raise CurateError(f"only {len(rows)} pool rows to train the matcher on; it needs at least 2")
    rng = np.random.default_rng(cfg.seed)
    model.train()
    last, steps = float("nan"), 0
    for _ in tqdm(range(cfg.epochs), desc="matcher", unit="epoch", disable=not progress):
        perm = rng.permutation(rows)
        tot, n = 0.0, 0
        for s in range(0, len(perm) - bs + 1, bs):  # full batches: the loss's difficulty is the batch size's
            b = perm[s: s + bs]
            iv, tv = model.encode_image(I[b]), model.encode_text(_bags(inp.tokens, b), T[b])
            logits = model.logit_scale.exp().clamp(max=100) * iv @ tv.T
            lab = torch.arange(len(b))
            loss = (torch.nn.functional.cross_entropy(logits, lab) + torch.nn.functional.cross_entropy(logits.T, lab)) / 2
            opt.zero_grad(set_to_none=True)
            opt_bag.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            opt_bag.step()
            tot, n, steps = tot + loss.item(), n + 1, steps + 1
        last = tot / max(n, 1)
    return model.state_dict(), {"rows": int(len(rows)), "steps": steps, "batch_size": bs,
                                "final_loss": round(last, 6)}


def score(state: dict, inp: Inputs, cfg: MatcherConfig) -> np.ndarray:
    """match_score per row (float32 cosine; NaN where the row has no thumbnail or CLIP vectors)."""
    import torch

    model = make_model(cfg, inp.image.shape[1], inp.clip_text.shape[1])
    model.load_state_dict(state)
    model.eval()
    out = np.full(len(inp.image), np.nan, np.float32)
    idx = np.flatnonzero(inp.ok)
    I, T = torch.from_numpy(inp.image), torch.from_numpy(inp.clip_text)
    with torch.no_grad():
        for s in range(0, len(idx), 8192):
            b = idx[s: s + 8192]
            out[b] = (model.encode_image(I[b]) * model.encode_text(_bags(inp.tokens, b), T[b])).sum(1).numpy()
    return out


def train_digest(train_uids: list[str], cfg: MatcherConfig, embeddings_model_id: str, shards: list[Path],
                 texts_digest: str) -> str:
    """What a trained matcher is a function of: its rows, config, the CLIP vectors' model, the shards it read
    the thumbnails from (name, size, mtime) and the captions."""
    h = hashlib.sha256("\n".join(sorted(train_uids)).encode())
    h.update(json.dumps(asdict(cfg), sort_keys=True).encode() + embeddings_model_id.encode() + texts_digest.encode()
             + TRAINING.encode())
    for f in shards:
        st = f.stat()
        h.update(f"\n{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()
