"""An image-text matching (ITM) head on a frozen dual encoder, trained with hard negatives (BLIP CapFilt's filter).

BLIP's filter (CapFilt) judges a pair with an ITM head on a *cross-attention fusion encoder*: the text encoder
attends to the image patches, and a binary classifier on the fused [CLS] says match / no match; it is trained
with hard negatives mined by the contrastive similarity. This is **not** that: it is a small MLP on the frozen,
L2-normalised embeddings of the bootstrapped dual encoder (`curate train-scorer --variant bootstrap`), on the
features ``[i, t, i*t, |i-t|]``. Why: a fusion encoder must run the text tower once per (image, caption) pair,
both in training (every hard negative) and when scoring the pool, and re-encode on every epoch; on 2 CPU cores
inside a 10-minute budget that leaves a few hundred steps of a model that has not learnt to fuse. The head on
frozen embeddings trains in seconds on ~10k pairs and their negatives, and it can still learn what the cosine
alone cannot: which dimensions matter for matching, and where the dual encoder's cosine is over-confident.

Training pairs (only trusted rows outside the held-out fraction, see curate/run/scorer.py):
  positives  every trusted pair (image i, its caption)
  negatives  per trusted image, the `hard` most similar *non-matching* trusted captions by text cosine (the
             caption of an image whose caption reads like this one) and the `hard` by image cosine (the caption
             of the most similar other image), skipping captions identical to the image's own (a duplicate pair
             is not a negative), plus `random` uniformly drawn trusted captions (the easy negatives a caption
             swap makes; without them the head would only ever see near misses).
Loss: binary cross-entropy, positives weighted so both classes count equally. The head then scores every pool
row: ``itm_score`` = sigmoid(logit), the head's probability that the pair matches.

**Neighbourhood agreement** (``neighbours`` > 0, the default; issue 19). The pool holds each concept many times
(an emoji in 6-12 art styles, an icon in several sets), so a clean pair's caption reads like the captions of its
image's nearest pool images, and its image looks like the images of its caption's nearest pool captions; a
swapped caption agrees with neither. For a pair (image of row j, caption of row k) the head also gets
`AGREEMENT_FEATURES` (`agreement`): the text cosine of the caption to the captions of the image's `neighbours`
nearest *reference* images (top-1 and mean), and the image cosine of the image to the images of the caption's
`neighbours` nearest reference captions (top-1 and mean). Neighbours exclude rows j and k themselves and rows
with j's image sha256 (an exact copy would agree trivially). The reference set is the pool rows outside the
held-out fifth (the rows stage 1 pretrained on), so a held-out row's score never depends on another held-out
row. Features are built per *pair*, so a negative (j's image, k's caption) gets the agreement of k's caption
with j's neighbours, as a swapped caption in the pool does. kNN: `curate.lib.faiss_index` (IVF above
FLAT_MAX_N rows), seconds at 100k rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.core import atomic
from curate.core.errors import CurateError

SCORE_COLUMN = "itm_score"
SCORES_FORMAT = "1"


@dataclass
class ItmConfig:
    """Hyperparameters of the head (fixed defaults; part of the head's checkpoint)."""

    hidden: int = 256
    hard: int = 3  # hard negatives per image, per kind (text cosine, image cosine)
    random: int = 2  # random negatives per image
    epochs: int = 12
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    neighbours: int = 10  # k of the neighbourhood-agreement features; 0 = the head on [i, t, i*t, |i-t|] only


AGREEMENT_FEATURES = ("caption_vs_image_nn_captions_top1", "caption_vs_image_nn_captions_mean",
                      "image_vs_caption_nn_images_top1", "image_vs_caption_nn_images_mean")
SEARCH_EXTRA = 6  # neighbours searched beyond k, so k remain after the exclusions


@dataclass
class Neighbourhood:
    """Every pool row's nearest reference rows by image and by caption (the input of `agreement`)."""

    img: np.ndarray  # (N, d) unit image vectors of the pool rows (zeros where missing)
    txt: np.ndarray  # (N, d) unit text vectors
    image_nn: np.ndarray  # (N, K) pool row ids of each row's nearest reference images, best first (-1: none)
    caption_nn: np.ndarray  # (N, K) pool row ids of each row's nearest reference captions
    image_group: np.ndarray  # (N,) id of the row's image sha256 (rows with one id are byte-identical images)
    k: int


def neighbourhood(img: np.ndarray, txt: np.ndarray, reference: np.ndarray, image_sha: list, k: int,
                  seed: int = 0) -> Neighbourhood:
    """kNN of every pool row's image among the reference rows' images, and of its caption among theirs
    (`reference`: pool row ids; faiss inner product on unit vectors)."""
    from curate.lib import faiss_index as fx
    from filters.common import normalise

    img, txt = normalise(img)[0], normalise(txt)[0]  # unit rows, missing (NaN) rows as zeros
    reference = np.asarray(reference, np.int64)
    want = min(k + SEARCH_EXTRA, len(reference))
    nn = []
    for x in (img, txt):
        index = fx.build_index(x[reference], fx.choose_index(len(reference)), seed=seed)
        _, ids = fx.knn(index, x, want, desc="itm neighbours")
        nn.append(np.where(ids >= 0, reference[np.maximum(ids, 0)], -1))
    _, group = np.unique(np.asarray(image_sha, dtype=object).astype(str), return_inverse=True)
    return Neighbourhood(img, txt, nn[0], nn[1], group.astype(np.int64), k)


def agreement(nb: Neighbourhood, j: np.ndarray, k: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """`AGREEMENT_FEATURES` (float32 (P, 4)) of the pairs (image of row j[p], caption of row k[p]); 0 where a
    pair has no usable neighbour."""
    j, k = np.asarray(j, np.int64), np.asarray(k, np.int64)
    out = np.zeros((len(j), len(AGREEMENT_FEATURES)), np.float32)
    for s in range(0, len(j), chunk):
        jj, kk = j[s: s + chunk], k[s: s + chunk]
        cols = []
        for cand, query, base in ((nb.image_nn[jj], nb.txt[kk], nb.txt), (nb.caption_nn[kk], nb.img[jj], nb.img)):
            bad = (cand < 0) | (cand == jj[:, None]) | (cand == kk[:, None])
            bad |= nb.image_group[np.maximum(cand, 0)] == nb.image_group[jj][:, None]
            order = np.argsort(bad, axis=1, kind="stable")[:, : nb.k]  # the k best usable ones, best first
            sel, good = np.take_along_axis(cand, order, 1), ~np.take_along_axis(bad, order, 1)
            sims = np.einsum("pd,pkd->pk", query, base[np.maximum(sel, 0)]) * good
            cnt = good.sum(1)
            cols += [sims[:, 0] * good[:, 0], sims.sum(1) / np.maximum(cnt, 1)]
        out[s: s + chunk] = np.stack(cols, 1)
    return out


def vectors(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """fixed_size_list<float16>[d] with nulls -> float32 (n, d), NaN rows for nulls (the pool's one converter; an
    empty file keeps its width d so files concatenate)."""
    from curate.pool.pool import vectors_from_column

    out = vectors_from_column(col, len(col))
    if out.shape[1] == 0 and pa.types.is_fixed_size_list(col.type):
        out = np.zeros((len(col), col.type.list_size), np.float32)
    return out


def load_embeddings(pool: Path, model_id: str) -> tuple[list[Path], list[np.ndarray], np.ndarray, np.ndarray]:
    """(files, uids per file, image vectors, text vectors) of POOL/embeddings/<model_id>/, rows in file order."""
    folder = Path(pool) / "embeddings" / model_id
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise CurateError(f"{folder}: no embeddings; run `curate embed` with this model first")
    uids, img, txt = [], [], []
    for f in files:
        t = pq.read_table(f, columns=["uid", "image_emb", "text_emb"])
        uids.append(np.asarray(t["uid"].to_pylist(), dtype=object))
        img.append(vectors(t["image_emb"]))
        txt.append(vectors(t["text_emb"]))
    return files, uids, np.concatenate(img), np.concatenate(txt)


def features(i, t, a=None):
    """The head's input: [i, t, i*t, |i-t|] (torch tensors, L2-normalised rows), then the agreement features `a`
    when the head uses them."""
    import torch

    parts = [i, t, i * t, (i - t).abs()]
    return torch.cat(parts if a is None else parts + [a], dim=-1)


def make_head(d: int, hidden: int, extra: int = 0):
    import torch

    return torch.nn.Sequential(torch.nn.Linear(4 * d + extra, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden),
                               torch.nn.GELU(), torch.nn.Linear(hidden, 1))


def mine_negatives(img: np.ndarray, txt: np.ndarray, text_ids: np.ndarray, cfg: ItmConfig) -> np.ndarray:
    """(image row, caption row) index pairs of negatives among the training rows (see the module doc)."""
    n = len(img)
    rng = np.random.default_rng(cfg.seed)
    pairs = []
    k = min(cfg.hard, n - 1)
    block = 1024
    for s in range(0, n, block):
        e = min(n, s + block)
        rows = np.arange(s, e)
        same = text_ids[rows][:, None] == text_ids[None, :]  # includes the row itself
        for sim in (txt[s:e] @ txt.T, img[s:e] @ img.T):
            sim = np.where(same, -np.inf, sim)
            if k > 0:
                top = np.argpartition(-sim, k - 1, axis=1)[:, :k] if k < n else np.argsort(-sim, axis=1)[:, :k]
                ok = np.isfinite(np.take_along_axis(sim, top, axis=1))
                r = np.repeat(rows[:, None], k, axis=1)
                pairs.append(np.stack([r[ok], top[ok]], axis=1))
    if cfg.random and n > 1:
        r = np.repeat(np.arange(n), cfg.random)
        c = rng.integers(0, n, len(r))
        ok = text_ids[r] != text_ids[c]
        pairs.append(np.stack([r[ok], c[ok]], axis=1))
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)


def train_head(img: np.ndarray, txt: np.ndarray, texts: list[str], cfg: ItmConfig, progress: bool = False,
               nb: Neighbourhood | None = None, rows: np.ndarray | None = None) -> tuple:
    """Train the head on aligned trusted rows (L2-normalised float32); return (state_dict, stats). With `nb`
    (and `rows`, the training rows' pool row ids) the head also learns from each pair's `agreement`."""
    import torch

    torch.manual_seed(cfg.seed)
    _, text_ids = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
    neg = mine_negatives(img, txt, text_ids, cfg)
    n = len(img)
    ii = np.concatenate([np.arange(n), neg[:, 0]])
    tt = np.concatenate([np.arange(n), neg[:, 1]])
    y = np.concatenate([np.ones(n, np.float32), np.zeros(len(neg), np.float32)])
    A = None
    if nb is not None:
        rows = np.asarray(rows, np.int64)
        A = torch.from_numpy(agreement(nb, rows[ii], rows[tt]))
    head = make_head(img.shape[1], cfg.hidden, 0 if A is None else A.shape[1])
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    pos_weight = torch.tensor(max(len(neg), 1) / max(n, 1))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    I, T, Y = torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(y)
    g = torch.Generator().manual_seed(cfg.seed)
    steps = cfg.epochs * -(-len(y) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(steps, 1), pct_start=0.1)
    head.train()
    last = float("nan")
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(y), generator=g)
        tot, cnt = 0.0, 0
        for s in range(0, len(y), cfg.batch_size):
            b = perm[s: s + cfg.batch_size]
            logit = head(features(I[ii[b]], T[tt[b]], None if A is None else A[b])).squeeze(-1)
            loss = loss_fn(logit, Y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot, cnt = tot + loss.item() * len(b), cnt + len(b)
        last = tot / max(cnt, 1)
    return head.state_dict(), {"positives": int(n), "negatives": int(len(neg)), "steps": int(steps),
                               "final_loss": round(last, 6)}


def score(state_dict: dict, d: int, hidden: int, img: np.ndarray, txt: np.ndarray,
          agree: np.ndarray | None = None) -> np.ndarray:
    """itm_score per row (float32, NaN where either vector is missing); `agree`: the rows' own `agreement`
    (pair = the row's image and caption) for a head trained with it."""
    import torch

    head = make_head(d, hidden, 0 if agree is None else agree.shape[1])
    head.load_state_dict(state_dict)
    head.eval()
    out = np.full(len(img), np.nan, np.float32)
    ok = np.isfinite(img).all(axis=1) & np.isfinite(txt).all(axis=1)
    idx = np.flatnonzero(ok)
    with torch.no_grad():
        for s in range(0, len(idx), 8192):
            b = idx[s: s + 8192]
            a = None if agree is None else torch.from_numpy(np.asarray(agree[b], np.float32))
            out[b] = torch.sigmoid(head(features(torch.from_numpy(img[b]), torch.from_numpy(txt[b]), a)).squeeze(-1)).numpy()
    return out


def scores_id(arch: str, head_path: Path) -> str:
    """The scores folder name: ``<arch>-itm__<first 12 hex of sha256(head file)>``, the model id of (``<arch>-itm``,
    head file), so a recipe step's ``pretrained: <head file>`` selects exactly this folder."""
    from curate.clip.models import model_id

    return model_id(f"{arch}-itm", str(head_path))


SCORE_DIGEST_KEY = "curate.score_digest"


def score_digest(train_digest: str, embeddings: list[Path], metadata: list[Path]) -> str:
    """What a scores folder is a function of: the head's training digest and each input file's name, size and
    mtime (a rewritten input, even an identical one, rescores: conservative and cheap to check)."""
    h = hashlib.sha256(train_digest.encode())
    for f in list(embeddings) + list(metadata):
        st = f.stat()
        h.update(f"\n{f.parent.name}/{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def scores_current(pool: Path, folder_id: str, files: list[Path], digest: str) -> bool:
    """True when POOL/embeddings/<folder_id>/ has exactly one scores file per embeddings file, each written for
    `digest` (read from the parquet footers only)."""
    folder = Path(pool) / "embeddings" / folder_id
    have = sorted(p.name for p in folder.glob("*.parquet")) if folder.is_dir() else []
    if have != sorted(f.name for f in files):
        return False
    try:
        return all((pq.read_schema(folder / name).metadata or {}).get(SCORE_DIGEST_KEY.encode()) == digest.encode()
                   for name in have)
    except (OSError, pa.ArrowInvalid):
        return False


def _same_table(path: Path, t: pa.Table) -> bool:
    """True when PATH already holds exactly `t` (rows and its schema metadata). A filter's up-to-date check
    fingerprints its input files by size and mtime, so rewriting identical scores would make every recipe that
    reads them filter again on a re-run (`curate demo` re-runs train-scorer on every call)."""
    try:
        old = pq.read_table(path)
    except (OSError, pa.ArrowInvalid):
        return False
    meta = old.schema.metadata or {}
    return old.equals(t) and all(meta.get(k) == v for k, v in (t.schema.metadata or {}).items())


def write_scores(pool: Path, folder_id: str, files: list[Path], uids: list[np.ndarray], columns: dict[str, np.ndarray],
                 meta: dict[str, str]) -> Path:
    """POOL/embeddings/<folder_id>/<shard>.parquet: uid + float32 score columns, one file per embeddings file,
    same rows in the same order (docs/FORMATS.md "Scores"). Returns the folder."""
    folder = Path(pool) / "embeddings" / folder_id
    off = 0
    for f, u in zip(files, uids):
        n = len(u)
        cols = {"uid": pa.array(list(u), pa.string())}
        for name, v in columns.items():
            x = np.asarray(v[off: off + n], np.float32)
            cols[name] = pa.array(x, pa.float32(), mask=np.isnan(x))
        off += n
        kv = {"curate.format": SCORES_FORMAT, "curate.model_id": folder_id, "curate.shard": f.stem, **meta}
        t = pa.table(cols).replace_schema_metadata({k: str(v) for k, v in kv.items()})
        if not _same_table(folder / f.name, t):  # unchanged scores keep their file, so readers stay up to date
            atomic.write_parquet(folder / f.name, t)
    for old in folder.glob("*.parquet"):  # a shard the embeddings no longer have
        if old.name not in {f.name for f in files}:
            old.unlink()
    return folder
