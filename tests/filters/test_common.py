"""filters/common.py: the language gate behaves the same in every filter that uses it, the model/pretrained
base is the one definition of those parameters, and path parameters follow one rule."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import filters.common as common
from curate.filter.recipe import load_filters
from filters.base import Batch
from filters.common import EmbeddingParams, language_gate, param_path, path_fields, resolve_path

# Each caption passes every other rule of every gated filter (> 2 words, > 5 characters, an ImageNet-21k
# noun), so the language alone decides; row 3's newline is read as a space.
CAPTIONS = ["a dog running on the beach with its owner", "un dog court sur la plage avec son maître",
            "der dog läuft am Strand mit seinem Besitzer", "a dog\nrunning on the beach with a ball"]
EXPECTED_KEEP = [True, False, False, True]
EXPECTED_REASON = [None, "language fr != en", "language de != en", None]
WORDNET = Path("/usr/share/wordnet/index.noun").exists() or bool(__import__("os").environ.get("CURATE_WORDNET_DIR"))


def _uids(n: int) -> list[str]:
    return [f"{i:032x}" for i in range(n)]


def _basic(tmp_path, gate: bool):
    from filters.basic import BasicFilter

    n = len(CAPTIONS)
    t = pa.table({"uid": _uids(n), "text": CAPTIONS, "original_width": [256] * n, "original_height": [256] * n})
    return BasicFilter(BasicFilter.Params(english=gate)), Batch(t), {}


def _text_based(tmp_path, gate: bool):
    if not WORDNET:
        pytest.skip("WordNet 3.0 (Debian wordnet-base) not installed")
    from filters.text_based import TextBasedFilter

    t = pa.table({"uid": _uids(len(CAPTIONS)), "text": CAPTIONS})
    return TextBasedFilter(TextBasedFilter.Params(english=gate)), Batch(t), {}


def _laion2b(tmp_path, gate: bool):
    from filters.laion2b import Laion2bFilter

    n = len(CAPTIONS)
    t = pa.table({"uid": _uids(n), "text": CAPTIONS, "clip_score": pa.array([0.5] * n, pa.float32())})
    return Laion2bFilter(Laion2bFilter.Params(english=gate)), Batch(t), {}


def _image_based(tmp_path, gate: bool):
    from filters.image_based import ImageBasedFilter

    # two tight clusters, a target image in each: every row is in a target cluster
    np.save(tmp_path / "targets.npy", np.eye(8, dtype=np.float32)[:2])
    emb = np.eye(8, dtype=np.float32)[[0, 0, 1, 1]]
    t = pa.table({"uid": _uids(len(CAPTIONS)), "text": CAPTIONS})
    f = ImageBasedFilter(ImageBasedFilter.Params(target="targets.npy", n_clusters=2, caption_filter=gate))
    return f, Batch(t, image_emb=emb), {"recipe_dir": str(tmp_path), "seed": 0}


GATED = {"basic": _basic, "text_based": _text_based, "laion2b": _laion2b, "image_based": _image_based}


@pytest.mark.parametrize("name", sorted(GATED))
def test_the_language_gate_is_the_same_in_every_filter(name, tmp_path, monkeypatch):
    f, batch, ctx = GATED[name](tmp_path, gate=True)
    f.setup(ctx)
    r = f.apply(batch)
    assert r.keep.tolist() == EXPECTED_KEEP
    assert list(r.reason) == EXPECTED_REASON
    # the gate alone gives the same answer
    reason = np.full(len(CAPTIONS), None, dtype=object)
    assert language_gate(pa.array(CAPTIONS), np.ones(len(CAPTIONS), bool), reason).tolist() == EXPECTED_KEEP
    assert reason.tolist() == EXPECTED_REASON
    # the filter goes through filters.common's gate (no copy of its own): a stubbed language ID reaches it
    monkeypatch.setattr(common, "detect_languages", lambda texts: ["xx"] * len(texts))
    r = f.apply(batch)
    assert not r.keep.any() and set(r.reason) == {"language xx != en"}
    # switched off, nothing is dropped for its language
    f, batch, ctx = GATED[name](tmp_path, gate=False)
    f.setup(ctx)
    assert f.apply(batch).keep.all()


def test_the_gate_identifies_only_the_candidates(monkeypatch):
    seen: list[list[str]] = []
    monkeypatch.setattr(common, "detect_languages", lambda texts: seen.append(texts) or ["fr"] * len(texts))
    reason = np.array(["words < 3", None, None], dtype=object)
    keep = language_gate(pa.array(["x", "un chien", None]), np.array([False, True, True]), reason)
    assert keep.tolist() == [False, False, False]
    assert seen == [["un chien", None]]  # the row an earlier rule dropped is never identified
    assert reason.tolist() == ["words < 3", "language fr != en", "language fr != en"]


def test_the_six_model_filters_share_one_definition_of_model_and_pretrained():
    registry = load_filters()
    with_model = {"clip_score", "dedup", "semdedup", "image_based", "decontaminate", "laion2b"}
    for n in with_model:
        p = registry[n].Params
        assert issubclass(p, EmbeddingParams), n
        assert {f.name for f in dataclasses.fields(p) if f.kw_only} >= {"model", "pretrained"}, n
    assert registry["laion2b"].Params().model == "ViT-B-32"  # a filter may change the default
    with pytest.raises(ValueError, match="model: expected a name without surrounding spaces"):
        registry["dedup"].Params(model=" ViT-B-32").check()


def test_path_parameters_follow_one_rule(tmp_path, monkeypatch):
    registry = load_filters()
    declared = {(n, f) for n, c in registry.items() for f in path_fields(c.Params)}
    assert declared == {("image_based", "target"), ("decontaminate", "evalsets"), ("text_based", "synsets_file")}
    monkeypatch.chdir(tmp_path)
    assert resolve_path("a/b", "/recipes") == Path("/recipes/a/b")
    assert resolve_path("/abs/x", "/recipes") == Path("/abs/x")
    assert resolve_path("a", None) == tmp_path / "a"  # a recipe given as text: the working directory
    assert resolve_path("~/x", "/recipes") == Path.home() / "x"
    p = registry["image_based"].Params(target="t.npy")
    assert param_path(p, "target", {"recipe_dir": "/r"}) == Path("/r/t.npy")
    # what the recipe validation resolved wins (the runner passes it in the context)
    assert param_path(p, "target", {"recipe_dir": "/r", "paths": {"target": "/elsewhere/t.npy"}}) == \
        Path("/elsewhere/t.npy")
