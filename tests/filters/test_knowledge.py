"""filters/knowledge.py: WordNet glosses of rare concepts appended in text_augmented, text untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from curate.lib import wordnet
from filters.base import Batch
from filters.knowledge import KnowledgeFilter

pytestmark = pytest.mark.skipif(
    not Path(wordnet.wordnet_source_dir(), "data.noun").is_file(),
    reason="wordnet-base not installed (make setup)",
)

SASHIMI = "sashimi: very thinly sliced raw fish"


def run(texts, **params):
    table = pa.table({"uid": [f"{i:032x}" for i in range(len(texts))], "text": pa.array(texts, pa.string())})
    f = KnowledgeFilter(KnowledgeFilter.Params(**params))
    f.setup({})
    before = table["text"].to_pylist()
    res = f.apply(Batch(table))
    assert table["text"].to_pylist() == before  # the original captions are never modified
    assert set(res.columns) == {"text_augmented"}
    return res, res.columns["text_augmented"].to_pylist()


def test_rare_concept_gets_its_gloss_common_ones_do_not():
    texts = ["salmon sashimi on a plate"] + ["a dog on the grass"] * 5 + ["a plate"] * 4
    res, aug = run(texts, rare_below=3, max_glosses=2)
    # salmon and sashimi are rare (1 caption each); plate appears in 5 captions: common
    assert aug[0].startswith("salmon sashimi on a plate. ")
    assert SASHIMI in aug[0] and "salmon: " in aug[0] and "plate:" not in aug[0]
    assert aug[1:] == texts[1:]  # dog, grass, plate: common -> unchanged
    assert res.keep.all() and res.score.tolist() == [2.0] + [0.0] * 9
    assert res.threshold == 3.0


def test_max_glosses_rarest_first_and_multiword_and_morphology():
    texts = ["two geese eat ice cream near a tabby cat", "geese again", "ice cream again"]
    _, aug = run(texts, rare_below=2, max_glosses=1)
    # goose and ice_cream appear twice (not rare); tabby cat once -> the only gloss
    assert aug[0] == "two geese eat ice cream near a tabby cat. tabby cat: a cat with a grey or tawny coat mottled with black."
    _, aug = run(["a bowl of ice creams"], rare_below=5, max_glosses=5)
    assert "ice cream: frozen dessert containing cream and sugar and flavoring" in aug[0]
    assert ". ice: " not in aug[0] and ". cream: " not in aug[0]
    _, aug = run(["two geese"], rare_below=5)
    assert aug[0].startswith("two geese. goose: ")
    _, aug = run(["salmon sashimi"], rare_below=5, max_glosses=0)
    assert aug == ["salmon sashimi"]


def test_nothing_for_stop_words_unknown_words_and_missing_text():
    texts = ["it is in the of and", "zorblax quuxified frobnitz", "", None, "Sashimi!"]
    res, aug = run(texts, rare_below=10)
    assert aug[:4] == ["it is in the of and", "zorblax quuxified frobnitz", "", None]
    assert aug[4] == f"Sashimi! {SASHIMI}."
    assert res.score.tolist() == [0, 0, 0, 0, 1]


def test_counts_are_pool_wide_and_deterministic():
    rng = np.random.default_rng(0)
    words = ["sashimi", "dog", "tabby", "violin", "kayak"]
    texts = [" ".join(rng.choice(words, 2, replace=False)) for _ in range(200)]
    texts.append("a lonely narwhal")
    res1, aug1 = run(texts, rare_below=2)
    res2, aug2 = run(list(reversed(texts)), rare_below=2)
    assert aug1 == list(reversed(aug2))
    assert sum(a != t for a, t in zip(aug1, texts)) == 1 and "narwhal: " in aug1[-1]


def test_registered():
    from curate.filter.recipe import load_filters

    assert load_filters()["knowledge"] is KnowledgeFilter
