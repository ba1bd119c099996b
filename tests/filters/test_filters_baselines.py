"""Each DataComp baseline filter against hand-computed expectations (filters called directly, no runner)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from filters.base import Batch
from filters.basic import BasicFilter, detect_languages
from filters.clip_score import ClipScoreFilter
from filters.image_based import ImageBasedFilter
from filters.laion2b import Laion2bFilter

EN = "a brown dog running on the beach"


def _uid(i: int) -> str:
    return f"{i:032x}"


def _basic(rows, **params):
    t = pa.table({
        "uid": [_uid(i) for i in range(len(rows))],
        "text": [r[0] for r in rows],
        "original_width": [r[1] for r in rows],
        "original_height": [r[2] for r in rows],
    })
    f = BasicFilter(BasicFilter.Params(**params))
    f.setup({})
    return f.apply(Batch(t))


def test_language_id_is_fasttext_lid176_offline():
    assert detect_languages([EN, "le chien court sur la plage avec son maître", "der Hund läuft am Strand entlang"]) == \
        ["en", "fr", "de"]


def test_basic_each_rule_at_its_boundary():
    rows = [
        (EN, 200, 600),                       # keep: min side 200 (>=), aspect exactly 3
        ("two words", 400, 400),              # 2 words: DataComp wants > 2
        ("a b c", 400, 400),                  # 3 words but 5 chars: wants > 5
        ("cat dog bird", 400, 400),           # 3 words, 12 chars, English -> keep
        (EN, 199, 400),                       # min side 199
        (EN, 200, 601),                       # aspect 3.005
        ("le chien court sur la plage avec son maître", 400, 400),  # French
        (EN, None, None),                     # no size known
        ("  \n  ", 400, 400),                 # blank caption
    ]
    r = _basic(rows)
    assert r.keep.tolist() == [True, False, False, True, False, False, False, False, False]
    assert list(r.reason) == [None, "words < 3", "chars < 6", None, "min side < 200", "aspect > 3",
                              "language fr != en", "min side < 200", "words < 3"]


def test_basic_thresholds_are_parameters():
    rows = [("two words", 150, 150), ("le chien court sur la plage", 400, 400)]
    r = _basic(rows, min_words=2, min_side=100, english=False)
    assert r.keep.tolist() == [True, True]


def _scores_batch(scores, uids=None):
    uids = uids or [_uid(i) for i in range(len(scores))]
    return Batch(pa.table({"uid": uids, "clip_score": pa.array(scores, pa.float32())}))


def test_clip_score_threshold_keeps_at_or_above_and_drops_missing():
    f = ClipScoreFilter(ClipScoreFilter.Params(threshold=0.3))
    r = f.apply(_scores_batch([0.1, 0.3, 0.35, None]))
    assert r.keep.tolist() == [False, True, True, False]
    assert r.reason[3] == "no clip score"
    assert r.threshold == 0.3


def test_clip_score_top_fraction_exact_count_and_uid_tiebreak():
    # 10 rows, top 30% = 3 rows. Scores tie at 0.5 for uids 2, 5, 7: sorted by uid, 2 and 5 win the
    # last two places after the single 0.9.
    scores = [0.1, 0.2, 0.5, 0.3, 0.05, 0.5, 0.0, 0.5, 0.9, None]
    uids = [_uid(i) for i in range(10)]
    rng = np.random.default_rng(0)
    perm = rng.permutation(10)  # the answer must not depend on row order
    f = ClipScoreFilter(ClipScoreFilter.Params(keep_top_fraction=0.3))
    r = f.apply(_scores_batch([scores[i] for i in perm], [uids[i] for i in perm]))
    kept = sorted(int(uids[perm[j]], 16) for j in np.flatnonzero(r.keep))
    assert kept == [2, 5, 8]
    assert r.threshold == pytest.approx(0.5)


def test_clip_score_datacomp_tie_rule_keeps_threshold_ties():
    # DataComp: threshold = sorted_desc[floor(N*p)] = sorted_desc[3] = 0.5, keep >= 0.5 -> 4 rows.
    scores = [0.1, 0.2, 0.5, 0.3, 0.05, 0.5, 0.0, 0.5, 0.9, 0.25]
    f = ClipScoreFilter(ClipScoreFilter.Params(keep_top_fraction=0.3, datacomp_ties=True))
    r = f.apply(_scores_batch(scores))
    assert np.flatnonzero(r.keep).tolist() == [2, 5, 7, 8]


def test_laion2b_needs_score_and_english():
    t = pa.table({
        "uid": [_uid(i) for i in range(4)],
        "text": [EN, EN, "le chien court sur la plage avec son maître", EN],
        "clip_score": pa.array([0.28, 0.279, 0.5, None], pa.float32()),
    })
    f = Laion2bFilter(Laion2bFilter.Params())
    f.setup({})
    r = f.apply(Batch(t))
    assert r.keep.tolist() == [True, False, False, False]
    assert r.reason[1] == "clip score < 0.28" and r.reason[2] == "language fr != en" and r.reason[3] == "no clip score"


@pytest.mark.skipif(not Path("/usr/share/wordnet/index.noun").exists() and not __import__("os").environ.get(
    "CURATE_WORDNET_DIR"), reason="WordNet 3.0 (Debian wordnet-base) not installed")
def test_text_based_first_noun_sense_in_imagenet21k(tmp_path):
    from filters.text_based import TextBasedFilter, load_wnids

    wnids = load_wnids()
    assert len(wnids) == 21843 and "n02084071" in wnids  # dog.n.01
    t = pa.table({"uid": [_uid(i) for i in range(5)],
                  "text": ["A Dog, on the grass!", "quickly and slowly", "le chien dans la maison",
                           "two apples", None]})
    f = TextBasedFilter(TextBasedFilter.Params())
    f.setup({"cache_dir": str(tmp_path)})
    r = f.apply(Batch(t))
    assert r.keep.tolist() == [True, False, False, True, False]
    assert r.score[0] >= 1 and r.score[1] == 0
    assert r.reason[1] == "no ImageNet-21k noun in caption"
    # A custom wnid list that lacks dog.n.01 and grass: the first caption no longer matches.
    custom = tmp_path / "wnids.txt"
    custom.write_text("n07739125\n")  # apple.n.01
    f2 = TextBasedFilter(TextBasedFilter.Params(synsets_file=str(custom)))
    f2.setup({})
    assert f2.apply(Batch(t)).keep.tolist() == [False, False, False, True, False]


def test_image_based_keeps_the_clusters_holding_targets(tmp_path):
    rng = np.random.default_rng(0)
    d, per = 16, 60
    centers = np.eye(d)[:4] * 1.0
    emb = np.concatenate([c + 0.05 * rng.standard_normal((per, d)) for c in centers]).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[7] = np.nan  # a row whose image could not be embedded
    n = len(emb)
    targets = (centers[[1, 3]] + 0.05 * rng.standard_normal((2, d))).astype(np.float32)
    np.save(tmp_path / "targets.npy", targets)
    f = ImageBasedFilter(ImageBasedFilter.Params(target="targets.npy", n_clusters=4, caption_filter=False))
    f.setup({"recipe_dir": str(tmp_path), "seed": 0})
    t = pa.table({"uid": [_uid(i) for i in range(n)], "text": [EN] * n})
    r = f.apply(Batch(t, image_emb=emb))
    expected = np.zeros(n, bool)
    expected[per:2 * per] = True
    expected[3 * per:] = True
    assert r.keep.tolist() == expected.tolist()
    assert r.reason[7] == "no image embedding"
    # same seed, same answer
    f2 = ImageBasedFilter(ImageBasedFilter.Params(target=str(tmp_path / "targets.npy"), n_clusters=4,
                                                  caption_filter=False))
    f2.setup({"seed": 0})
    assert f2.apply(Batch(t, image_emb=emb)).keep.tolist() == r.keep.tolist()


def test_image_based_caption_filter_and_missing_target(tmp_path):
    from curate.core.errors import CurateError

    f = ImageBasedFilter(ImageBasedFilter.Params(target=str(tmp_path / "nope")))
    with pytest.raises(CurateError, match="nope"):
        f.setup({})
    (tmp_path / "empty").mkdir()
    f = ImageBasedFilter(ImageBasedFilter.Params(target=str(tmp_path / "empty")))
    with pytest.raises(CurateError, match="no images"):
        f.setup({})
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((30, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    np.save(tmp_path / "t.npy", emb)
    f = ImageBasedFilter(ImageBasedFilter.Params(target=str(tmp_path / "t.npy"), n_clusters=30))
    f.setup({})
    texts = [EN] * 28 + ["cat", "le chien court sur la plage avec son maître"]
    r = f.apply(Batch(pa.table({"uid": [_uid(i) for i in range(30)], "text": texts}), image_emb=emb))
    assert r.keep[:28].all()  # every row is its own cluster, each holding its own target
    assert r.reason[28] == "caption too short" and r.reason[29] == "language fr != en"
