"""`curate train-scorer` v2: bootstrap / itm variants, held-out rows, the `score` filter, collapse check, AUC per kind."""

from __future__ import annotations

import json
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.core import atomic
from curate.core.errors import CurateError
from tests.pool_factory import make_pool

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _shard_uids(subset: Path) -> set[str]:
    out = set()
    for t in sorted((subset / "shards").glob("*.tar")):
        with tarfile.open(t) as tf:
            for m in tf:
                if m.name.endswith(".json"):
                    out.add(json.loads(tf.extractfile(m).read())["uid"])
    return out


@pytest.fixture(scope="module")
def itm_run(tmp_path_factory):
    """The itm variant (bootstrap stages + head) at the debug scale on a 160-row pool with a truth sidecar."""
    from curate.run.scorer import ScorerConfig, train_scorer

    tmp = tmp_path_factory.mktemp("scorer")
    fp = make_pool(tmp / "pool", n_shards=2, per_shard=80, corrupt=0, failed=2)
    n = len(fp.all_uids)
    source = ["tuxpaint" if i % 4 else "openclipart" for i in range(n)]
    noise = ["caption_swap" if i % 7 == 0 else ("exact_dup" if i % 11 == 0 else "none") for i in range(n)]
    truth = tmp / "truth.parquet"
    atomic.write_parquet(truth, pa.table({"uid": fp.all_uids, "source": source, "noise": noise}))
    from curate.run.itm import ItmConfig
    from curate.run.matcher import MatcherConfig

    cfg = ScorerConfig(pool=fp.pool, out=tmp / "scorer.pt", truth=truth, scale="debug", device="cpu", workers=0,
                       progress=False, variant="itm", itm=ItmConfig(hidden=32, epochs=2),  # seconds, not a good head
                       matcher=MatcherConfig(hidden=32, epochs=2, batch_size=32, buckets=1 << 12))
    s = train_scorer(cfg)
    return {"fp": fp, "truth": truth, "summary": s, "cfg": cfg, "tmp": tmp}


def test_itm_variant_end_to_end_and_held_out_rows_never_train(itm_run):
    from curate.core import uids as uidlib
    from curate.core.hashing import sha256_file
    from curate.run.scorer import ScorerConfig, is_heldout, train_scorer

    s, fp, cfg = itm_run["summary"], itm_run["fp"], itm_run["cfg"]
    success = set(fp.success_uids())
    held = {u for u, h in zip(sorted(success), is_heldout(sorted(success))) if h}
    assert held and s["heldout"]["heldout_rows"] == len(held) and s["heldout"]["pool_rows"] == len(success)
    pre, fine = cfg.work / "pretrain", cfg.work / "finetune"
    pre_uids, fine_uids = set(uidlib.decode(uidlib.load(pre / "uids.npy"))), set(uidlib.decode(uidlib.load(fine / "uids.npy")))
    assert pre_uids == success - held  # stage 1: the whole downloaded pool but the held-out fifth
    assert fine_uids and not fine_uids & held and fine_uids < pre_uids
    for sub in (pre, fine):  # what the trainer actually reads
        assert not _shard_uids(sub) & held
    # stage 2 starts from stage 1's weights; both are unofficial runs
    info2 = json.loads((Path(s["stages"]["finetune"]["run"]) / "info.json").read_text())
    final1 = Path(s["stages"]["pretrain"]["run"]) / "final.pt"
    assert info2["init_checkpoint"]["sha256"] == sha256_file(final1) and info2["official"] is False
    # the head's score column, one per embedded row, readable by name
    scores = pq.read_table(s["scores"])
    emb = pq.read_table(fp.pool / "embeddings" / s["model_id"], columns=["uid"])
    assert scores.column_names == ["uid", "itm_score", "match_score"]
    assert scores["uid"].to_pylist() == emb["uid"].to_pylist()
    v = scores["itm_score"].to_numpy(zero_copy_only=False)
    assert np.all((v >= 0) & (v <= 1))
    m = scores["match_score"].to_numpy(zero_copy_only=False)
    assert np.all(np.isfinite(m) & (m >= -1.0001) & (m <= 1.0001))  # a cosine, for every embedded row
    # the matcher trained on the embedded rows outside the held-out fifth only, cross-fitted in two halves
    from curate.run.scorer import uid_fold

    embedded = sorted(set(emb["uid"].to_pylist()))
    folds = uid_fold(embedded)
    assert s["matcher"]["rows"] == len(set(embedded) - held) and Path(s["matcher"]["checkpoint"]).is_file()
    assert [p["rows"] for p in s["matcher"]["models"]] == [int(np.isin(folds, [1, 2, 3, 4]).sum() - (folds == f).sum())
                                                            for f in (1, 2, 3, 4)]  # matcher f never sees fold f
    # the report: every score column, every recorded noise kind, a random baseline, held-out rows only
    rep = json.loads(Path(s["summary"]).read_text())["report"]
    assert set(rep["columns"]) == {"clip_score", "itm_score", "match_score"}
    for col in rep["columns"].values():
        assert col["heldout_only"] and col["rows"] <= len(held)
        assert "caption_swap" in col["kinds"] and all("random_auc" in k for k in col["kinds"].values())
    files = sorted(Path(s["scores"]).glob("*.parquet"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = train_scorer(ScorerConfig(**{**cfg.__dict__}))
    assert again["up_to_date"]  # nothing changed: nothing retrained ...
    assert again["itm"]["scored"] is False and again["scores"] == s["scores"]  # ... and nothing rescored
    assert [f.stat().st_mtime_ns for f in files] == stamps
    # scores written for other inputs are not current: a changed digest in one footer makes the next run rescore
    t = pq.read_table(files[0])
    meta = dict(t.schema.metadata)
    meta[b"curate.score_digest"] = b"stale"
    atomic.write_parquet(files[0], t.replace_schema_metadata(meta))
    third = train_scorer(ScorerConfig(**{**cfg.__dict__}))
    assert third["up_to_date"] and third["itm"]["scored"] is True
    assert pq.read_table(files[0])["itm_score"].equals(t["itm_score"])  # the same head gives the same scores
    assert pq.read_table(files[0])["match_score"].equals(t["match_score"])  # the saved matcher, not a retrained one


def _score_recipe(tmp: Path, column: str, frac: float = 0.5) -> Path:
    r = tmp / f"score_{column}.yaml"
    r.write_text(textwrap.dedent(f"""\
        name: by_{column}
        steps:
          - score: {{model: curate-debug-itm, column: {column}, keep_top_fraction: {frac}}}
        """))
    return r


def test_score_filter_selects_the_named_column_and_names_a_missing_one(itm_run):
    from curate.filter.engine import FilterConfig, filter_pool

    s, fp, tmp = itm_run["summary"], itm_run["fp"], itm_run["tmp"]
    out = tmp / "by_itm"
    filter_pool(FilterConfig(recipe=str(_score_recipe(tmp, "itm_score")), pool=str(fp.pool), out=str(out),
                             progress=False, workers=1, report=False))
    scores = pq.read_table(s["scores"]).to_pylist()
    ranked = sorted(scores, key=lambda r: (-r["itm_score"], r["uid"]))
    want = sorted(r["uid"] for r in ranked[: len(scores) // 2])
    assert sorted(pq.read_table(out / "subset.parquet", columns=["uid"])["uid"].to_pylist()) == want
    pinned = tmp / "pinned.yaml"  # the head file names its folder exactly, like a checkpoint names embeddings
    pinned.write_text(_score_recipe(tmp, "itm_score").read_text().replace(
        "model: curate-debug-itm,", f"model: curate-debug-itm, pretrained: {s['itm_head']},"))
    filter_pool(FilterConfig(recipe=str(pinned), pool=str(fp.pool), out=str(tmp / "pinned"), progress=False,
                             workers=1, report=False))
    assert pq.read_table(tmp / "pinned" / "subset.parquet", columns=["uid"])["uid"].to_pylist() == want
    with pytest.raises(CurateError, match="nosuch_score"):
        filter_pool(FilterConfig(recipe=str(_score_recipe(tmp, "nosuch_score")), pool=str(fp.pool),
                                 out=str(tmp / "bad"), progress=False, workers=1, report=False))


def test_score_filter_params_are_validated(tmp_path):
    from curate.filter.recipe import load_recipe

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: b\nsteps:\n  - score: {column: itm_score}\n")
    with pytest.raises(CurateError, match="threshold"):
        load_recipe(bad)
    bad.write_text("name: b\nsteps:\n  - score: {column: image_emb, threshold: 0.5}\n")
    with pytest.raises(CurateError, match="not a score column"):
        load_recipe(bad)


def test_collapse_check_refuses_a_collapsed_space_and_passes_a_healthy_one():
    from curate.lib.collapse import check_not_collapsed, collapse_stats
    from filters.base import Batch
    from filters.dedup import DedupFilter
    from filters.semdedup import SemDedupFilter

    rng = np.random.default_rng(0)
    healthy = rng.standard_normal((300, 32)).astype(np.float32)
    healthy /= np.linalg.norm(healthy, axis=1, keepdims=True)
    centre = rng.standard_normal(32)
    same_way = (centre + 0.05 * rng.standard_normal((300, 32))).astype(np.float32)  # every pair ~0.99
    on_a_line = (np.outer(rng.choice([-1.0, 1.0], 300), centre) + 1e-3 * rng.standard_normal((300, 32))).astype(np.float32)
    st = check_not_collapsed(healthy, "test", "m__x")
    assert st["checked"] and abs(st["mean_cosine"]) < 0.05 and st["participation_ratio"] > 20
    with pytest.raises(CurateError, match=r"m__x.*mean off-diagonal cosine 0\.9"):
        check_not_collapsed(same_way, "test", "m__x")
    with pytest.raises(CurateError, match=r"participation ratio 1\.0"):
        check_not_collapsed(on_a_line, "test", "m__x")
    assert not check_not_collapsed(same_way[:10], "test", "m__x")["checked"]  # too few rows to judge
    assert collapse_stats(np.vstack([healthy, np.full((5, 32), np.nan, np.float32)]))["sampled"] == 300

    def batch(x):
        n = len(x)
        return Batch(pa.table({"uid": [f"{i:032x}" for i in range(n)], "sha256": [f"{i:064x}" for i in range(n)],
                               "shard": [0] * n, "key": [f"{i:09d}" for i in range(n)]}), image_emb=x)

    for cls in (DedupFilter, SemDedupFilter):
        f = cls(cls.Params())
        f.setup({"seed": 0, "model_id": "curate-tiny__abc"})
        assert f.apply(batch(healthy)).keep.all()
        with pytest.raises(CurateError, match="curate-tiny__abc.*collapsed"):
            f.apply(batch(same_way))


def test_score_auc_per_kind_on_held_out_rows_with_a_known_answer(tmp_path):
    from curate.run.scorer import is_heldout, score_auc

    uids = [f"{i:032x}" for i in range(400)]
    held = [u for u, h in zip(uids, is_heldout(uids)) if h][:9]
    train = [u for u, h in zip(uids, is_heldout(uids)) if not h][:4]
    # held out: clean 0.9 0.8 0.5 | caption_swap 0.6 0.1 | exact_dup 0.95 0.85 | empty_caption (no score) ; NaN row
    noise = ["none", "none", "none", "caption_swap", "caption_swap", "exact_dup", "exact_dup", "empty_caption", "none"]
    score = [0.9, 0.8, 0.5, 0.6, 0.1, 0.95, 0.85, None, float("nan")]
    # rows used in training would change the answer if they counted: a perfect swap at 0.0, a clean row at 1.0
    noise += ["caption_swap", "none", "exact_dup", "none"]
    score += [0.0, 1.0, 0.0, 1.0]
    ids = held + train
    emb = tmp_path / "pool" / "embeddings" / "m-itm__x"
    atomic.write_parquet(emb / "00000000.parquet", pa.table({"uid": ids, "itm_score": pa.array(score, pa.float32())}))
    truth = tmp_path / "truth.parquet"
    atomic.write_parquet(truth, pa.table({"uid": ids, "noise": noise}))
    r = score_auc(tmp_path / "pool", "m-itm__x", truth, column="itm_score")
    assert r["rows"] == 7 and r["n_clean"] == 3 and set(r["kinds"]) == {"caption_swap", "exact_dup"}
    # clean > swap: 0.9>0.6 0.9>0.1 0.8>0.6 0.8>0.1 0.5>0.1 (0.5<0.6) -> 5/6 ; clean > dup: only 0.9>0.85 -> 1/6
    assert r["kinds"]["caption_swap"]["auc"] == pytest.approx(5 / 6)
    assert r["kinds"]["exact_dup"]["auc"] == pytest.approx(1 / 6)
    assert r["kinds"]["caption_swap"]["n_noisy"] == 2 and 0 <= r["kinds"]["caption_swap"]["random_auc"] <= 1
    assert score_auc(tmp_path / "pool", "m-itm__x", truth, column="itm_score", heldout_only=False)["rows"] == 11
    with pytest.raises(CurateError, match="no column 'clip_score'"):
        score_auc(tmp_path / "pool", "m-itm__x", truth, column="clip_score")


def test_agreement_features_per_pair_exclude_the_pair_rows_and_identical_images():
    """A caption agrees with its image's neighbours' captions and a swapped one does not; the pair's own rows and
    byte-identical images never count as neighbours; held-out rows are not in the reference set."""
    from curate.run import itm

    rng = np.random.default_rng(0)
    concepts = rng.standard_normal((4, 16)).astype(np.float32)
    c = np.repeat(np.arange(4), 5)  # 4 concepts x 5 rows
    img = concepts[c] + 0.1 * rng.standard_normal((20, 16)).astype(np.float32)
    txt = concepts[c] @ rng.standard_normal((16, 16)).astype(np.float32) + 0.1 * rng.standard_normal((20, 16)).astype(np.float32)
    sha = [f"s{i}" for i in range(20)]
    sha[1] = sha[0]  # rows 0 and 1: the same image file
    ref = np.arange(20) != 19  # row 19 held out of the reference set
    nb = itm.neighbourhood(img, txt, np.flatnonzero(ref), sha, k=3)
    assert not (nb.image_nn == 19).any() and not (nb.caption_nn == 19).any()
    rows = np.arange(20)
    own = itm.agreement(nb, rows, rows)
    swapped = itm.agreement(nb, rows, (rows + 5) % 20)  # every caption from another concept
    assert own.shape == (20, len(itm.AGREEMENT_FEATURES))
    assert (own > swapped).all()  # every feature, every row
    # what row 0's features were built from: not itself, not row 1 (same sha256), its concept's other rows
    from filters.common import normalise

    tn, im = normalise(txt)[0], normalise(img)[0]
    nearest = max((2, 3, 4), key=lambda j: float(im[0] @ im[j]))  # top-1: the caption of the nearest image
    assert own[0, 0] == pytest.approx(float(tn[0] @ tn[nearest]), abs=1e-5)
    assert own[0, 1] == pytest.approx(float(np.mean([tn[0] @ tn[j] for j in (2, 3, 4)])), abs=1e-5)
    # a pair built from rows 5 and 6 excludes both rows from both neighbour lists
    a = itm.agreement(nb, np.array([5]), np.array([6]))
    want = np.mean([tn[6] @ tn[j] for j in (7, 8, 9)])
    assert a[0, 1] == pytest.approx(float(want), abs=1e-5)


def test_token_matrix_is_a_mean_bag_with_words_and_trigrams_in_separate_halves():
    from curate.run.matcher import token_matrix

    x = token_matrix(["Calendar week", "calendar", "", None], 1 << 10)
    assert x.shape == (4, 1 << 10)
    np.testing.assert_allclose(np.asarray(x.sum(axis=1)).ravel(), [1, 1, 0, 0], atol=1e-6)
    one = x[1].indices
    assert (one < 512).sum() == 1 and (one >= 512).sum() >= 3  # "calendar": one word, its trigrams in the other half
    assert set(one) <= set(x[0].indices)  # case-folded: the same tokens
    assert x[0].nnz > x[1].nnz  # "week" and the bigram add tokens


def test_matcher_learns_to_tell_swapped_captions_from_clean_ones_on_held_out_rows():
    """Images whose pixels show one of 6 shapes, captions naming the shape in varied words: trained on 480 rows,
    the matcher must rank 60 held-out rows' true captions above swapped ones (AUC > 0.9; chance 0.5)."""
    from curate.run import matcher
    from curate.run.scorer import roc_auc

    rng = np.random.default_rng(0)
    cfg = matcher.MatcherConfig(hidden=64, dim=32, epochs=30, batch_size=64, buckets=1 << 12, use_clip=False)
    names = ["red circle", "blue square", "green triangle", "yellow star", "black arrow", "white cross"]
    extra = ["icon", "outline", "filled", "24", "small", "bold", ""]
    n = 600
    cls = rng.integers(0, len(names), n)
    protos = rng.integers(0, 256, (len(names), cfg.thumb_dims))
    thumbs = np.clip(protos[cls] + rng.normal(0, 40, (n, cfg.thumb_dims)), 0, 255).astype(np.uint8)
    texts = [f"{names[c]} {extra[rng.integers(len(extra))]}".strip() for c in cls]
    found = np.ones(n, bool)
    held = np.arange(n) >= 540
    swapped = held & (rng.random(n) < 0.5)
    for i in np.flatnonzero(swapped):  # a caption of another shape, as the offline pool's caption_swap does
        texts[i] = names[(cls[i] + 1 + rng.integers(len(names) - 1)) % len(names)]
    empty = np.zeros((n, 0), np.float32)
    inp, _, _ = matcher.inputs(empty, empty, thumbs, found, texts, cfg, fit_rows=np.flatnonzero(~held))
    state, stats = matcher.train(inp, np.flatnonzero(~held), cfg)
    assert stats["rows"] == 540 and stats["steps"] == 30 * (540 // 64)
    sc = matcher.score(state, inp, cfg)
    assert roc_auc(~swapped[held], sc[held]) > 0.9


def test_thumbnails_come_from_the_shards_and_an_undecodable_image_is_not_found(tmp_path):
    from curate.run import matcher

    fp = make_pool(tmp_path / "pool", n_shards=2, per_shard=10, corrupt=2, failed=1)
    uids = np.array(sorted(fp.all_uids) + ["not-in-pool"], dtype=object)
    cfg = matcher.MatcherConfig()
    th, found = matcher.thumbnails(fp.pool, uids, cfg, workers=2)
    assert th.shape == (len(uids), cfg.thumb_dims) and th.dtype == np.uint8
    assert not found[-1] and not th[-1].any()
    assert fp.corrupt_uids and {u for u, f in zip(uids, found) if f} == set(fp.success_uids()) - set(fp.corrupt_uids)
    assert th[found].std() > 0  # real pixels, not zeros
