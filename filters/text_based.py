"""``text_based``: DataComp's text-based baseline: English captions naming an ImageNet-21k class.

DataComp keeps a caption when it is English (fastText top label) and any word's first WordNet
synset is one of ImageNet-21k's synsets (``baselines/apply_filter.py``, text-entity filter). Here:
- words are ``text.split()`` with surrounding punctuation stripped ("dog," -> "dog"; DataComp looks
  "dog," up as is and misses it), looked up with WordNet's morphy (plurals) via `curate.lib.wordnet`;
- "first synset" is the most frequent *noun* sense (DataComp's nltk call mixes parts of speech, so
  a verb's byte offset could collide with a noun wnid; wnids are noun offsets, so nouns only is
  the intended rule);
- the ImageNet-21k wnid list is timm's bundled ``imagenet21k_goog_synsets.txt`` (21,843 wnids,
  offline; `synsets_file` may point at another list, one wnid per line).
The score recorded is the number of caption words that matched.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from filters.base import Batch, Filter, StepResult, register
from filters.common import column, language_gate, language_model, param_path

_PUNCT = string.punctuation + "“”‘’«»…"


@lru_cache(maxsize=4)
def load_wnids(path: str | None = None) -> frozenset[str]:
    """ImageNet-21k wnids (``n`` + 8 digits) from timm's bundled list, or from `path`."""
    from curate.core.errors import CurateError, MissingDependencyError

    if path is None:
        try:
            import importlib.resources

            p = importlib.resources.files("timm") / "data" / "_info" / "imagenet21k_goog_synsets.txt"
        except ImportError:
            raise MissingDependencyError("timm (ships the ImageNet-21k synset list)", "pip install timm") from None
    else:
        p = Path(path)
    try:
        lines = p.read_text().split()
    except OSError as e:
        raise CurateError(f"{p}: cannot read the wnid list ({e})") from None
    bad = [w for w in lines if not (len(w) == 9 and w[0] == "n" and w[1:].isdigit())]
    if bad:
        raise CurateError(f"{p}: not a wnid list (e.g. {bad[0]!r}; expected lines like n02084071)")
    return frozenset(lines)


@register
class TextBasedFilter(Filter):
    """English captions with at least one word whose most frequent noun sense is an ImageNet-21k class."""

    name = "text_based"
    scope = "row"
    columns = ("text",)

    @dataclass
    class Params:
        english: bool = True
        # default: timm's imagenet21k_goog_synsets.txt; a relative path is read from the recipe's folder
        synsets_file: str | None = field(default=None, metadata={"path": True})

    def setup(self, context) -> None:
        from curate.lib.wordnet import get_wordnet

        path = param_path(self.params, "synsets_file", context) if self.params.synsets_file else None
        self.wnids = load_wnids(str(path) if path else None)
        get_wordnet()
        if self.params.english:
            language_model()

    @staticmethod
    @lru_cache(maxsize=500_000)
    def _word_wnid(word: str) -> str | None:
        from curate.lib.wordnet import first_noun_wnid

        return first_noun_wnid(word)

    def count_matches(self, text: str | None) -> int:
        n = 0
        for raw in (text or "").split():
            w = raw.strip(_PUNCT)
            if w and self._word_wnid(w.lower()) in self.wnids:
                n += 1
        return n

    def apply(self, batch: Batch) -> StepResult:
        text = column(batch.table, "text")
        matches = np.array([self.count_matches(t) for t in text.to_pylist()], dtype=np.float64)
        reason = np.full(len(matches), None, dtype=object)
        reason[matches == 0] = "no ImageNet-21k noun in caption"
        keep = matches > 0
        if self.params.english:
            keep = language_gate(text, keep, reason)
        return StepResult(keep=keep, score=matches, reason=reason)
