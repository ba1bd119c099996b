"""``knowledge``: append WordNet glosses of rare concepts to captions (K-LITE style), in ``text_augmented``.

Recipe: ``knowledge: {source: wordnet, max_glosses: 2, rare_below: 100}``

Why: a model sees a rare concept ("sashimi", "tabby") too few times to learn it from short captions;
K-LITE (Shen et al., 2022) showed that adding the concept's dictionary definition to the caption
helps. For each caption:

1. find WordNet nouns (`curate.lib.wordnet.find_nouns`: longest multi-word lemma first, so "ice cream"
   is one concept; plurals and irregular forms via morphy; stop words and words WordNet does not
   know as nouns are skipped), taking each word's most frequent noun sense;
2. count, over every row that reaches this step, how many captions mention each concept;
3. concepts mentioned in fewer than ``rare_below`` captions get their gloss appended, rarest first
   (then in caption order), at most ``max_glosses``:
   "salmon sashimi on a plate" -> "salmon sashimi on a plate. sashimi: very thinly sliced raw fish."

The filter keeps every row, never changes ``text``, and writes ``text_augmented`` for every row
(equal to ``text`` when nothing was added), which the reshard stage writes as the caption. The
score is the number of glosses added. It is pool-scope because rarity is a pool-wide count.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa

from curate.lib import wordnet
from filters.base import Batch, Filter, StepResult, register
from filters.common import column


def augment(text: str, glosses: list[str]) -> str:
    """Caption plus glosses as sentences: 'text. word: gloss. word2: gloss2.'"""
    if not glosses:
        return text
    base = text.rstrip()
    sep = " " if base.endswith((".", "!", "?")) else ". "
    return base + sep + ". ".join(glosses) + "."


@register
class KnowledgeFilter(Filter):
    """Append WordNet definitions of concepts that are rare in the pool to a `text_augmented` column."""

    name = "knowledge"
    scope = "pool"
    columns = ("text",)
    embeddings = ()

    @dataclass
    class Params:
        source: Literal["wordnet"] = "wordnet"
        max_glosses: int = field(default=2, metadata={"min": 0, "max": 20})
        rare_below: int = field(default=100, metadata={"min": 1})
        max_words: int = field(default=3, metadata={"min": 1, "max": 6})  # longest multi-word lemma tried

    def setup(self, context) -> None:
        wordnet.get_wordnet()  # load once, before the pool pass (raises a clear error if missing)

    def apply(self, batch: Batch) -> StepResult:
        p = self.params
        texts = column(batch.table, "text").to_pylist()
        n = len(texts)
        # Concepts per distinct caption: (display name, synset) in caption order, each once.
        concepts: dict[str, list[tuple[str, object]]] = {}
        for t in set(texts):
            if t is None:
                continue
            seen: dict[str, tuple[str, object]] = {}
            for m in wordnet.find_nouns(t, max_words=p.max_words):
                seen.setdefault(m.synset.name(), (m.lemma.replace("_", " "), m.synset))
            concepts[t] = list(seen.values())
        counts: Counter[str] = Counter()
        for t in texts:
            if t is not None:
                counts.update(s.name() for _, s in concepts[t])
        out: list[str | None] = []
        added = np.zeros(n)
        memo: dict[str, tuple[str, int]] = {}
        for r, t in enumerate(texts):
            if t is None:
                out.append(None)
                continue
            if t not in memo:
                rare = [(counts[s.name()], pos, name, s) for pos, (name, s) in enumerate(concepts[t])
                        if counts[s.name()] < p.rare_below]
                rare.sort(key=lambda c: (c[0], c[1]))
                glosses = [f"{name}: {wordnet.gloss(s).rstrip('. ')}" for _, _, name, s in rare[: p.max_glosses]]
                memo[t] = (augment(t, glosses), len(glosses))
            text_aug, k = memo[t]
            out.append(text_aug)
            added[r] = k
        return StepResult(keep=np.ones(n, dtype=bool), score=added, reason=[None] * n, threshold=float(p.rare_below),
                          columns={"text_augmented": pa.array(out, pa.string())})
