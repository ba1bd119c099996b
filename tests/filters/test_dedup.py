"""filters/dedup.py and curate/lib/faiss_index.py: exact + near duplicate removal, one kept per group."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest

from curate.lib import faiss_index
from filters.base import Batch
from filters.dedup import DedupFilter

D = 64


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def near(v, cos, rng):
    """A unit vector with cosine exactly `cos` to unit vector v."""
    g = rng.standard_normal(v.shape).astype(np.float32)
    g -= (g @ v) * v
    g /= np.linalg.norm(g)
    return unit(cos * v + np.sqrt(1 - cos**2) * g)


def make_batch(img, txt=None, sha=None, text=None, clip=None, uids=None, shard=None, key=None):
    n = len(img)
    uids = uids or [f"{i:032x}" for i in range(n)]
    cols = {
        "uid": uids,
        "sha256": sha if sha is not None else [f"{i:064x}" for i in range(n)],
        "text": text if text is not None else [f"caption {i}" for i in range(n)],
        "shard": shard if shard is not None else [0] * n,
        "key": key if key is not None else [f"{i:09d}" for i in range(n)],
    }
    if clip is not None:
        cols["clip_score"] = pa.array(clip, pa.float32())
    return Batch(pa.table(cols), image_emb=np.asarray(img, np.float32),
                 text_emb=None if txt is None else np.asarray(txt, np.float32))


def run(batch, **params):
    f = DedupFilter(DedupFilter.Params(**params))
    f.setup({"seed": 0})
    return f.apply(batch), f


def planted(n, pairs, rng, cos_range=(0.96, 0.995)):
    x = unit(rng.standard_normal((n, D)))
    a = rng.choice(n, 2 * pairs, replace=False)
    src, dst = a[:pairs], a[pairs:]
    for s, d in zip(src, dst):
        x[d] = near(x[s], rng.uniform(*cos_range), rng)
    return x, src, dst


def test_planted_pairs_found_and_one_kept_per_pair():
    rng = np.random.default_rng(1)
    x, src, dst = planted(3000, 100, rng)
    res, f = run(make_batch(x), threshold=0.95)
    assert f.last_index.kind == "flat"
    # Exactly one of each planted pair dropped, the first (lower row = earlier key) kept.
    for s, d in zip(src, dst):
        assert res.keep[s] != res.keep[d]
        kept, drop = (s, d) if res.keep[s] else (d, s)
        assert kept == min(s, d)
        assert res.reason[drop].startswith(f"duplicate of {kept:032x}")
        assert res.score[drop] >= 0.95
    assert (~res.keep).sum() == 100  # random 64-d vectors are never that similar by chance
    assert res.threshold == 0.95


def test_ivf_index_recall_on_planted_pairs():
    rng = np.random.default_rng(2)
    x, src, dst = planted(30_000, 300, rng)
    i, j, s, choice = faiss_index.near_pairs(x, 0.95, index="auto")
    assert choice.kind == "ivf" and choice.nlist >= 64
    found = set(zip(i.tolist(), j.tolist()))
    recall = np.mean([(min(a, b), max(a, b)) in found for a, b in zip(src, dst)])
    assert recall >= 0.99
    assert (s >= 0.95).all() and (i < j).all()


def test_groups_are_transitive():
    rng = np.random.default_rng(3)
    base = unit(rng.standard_normal((10, D)))
    a = base[0]
    b = near(a, 0.97, rng)
    # c: similar to b (0.97) but only ~0.88 to a, below the threshold.
    c = near(b, 0.97, rng)
    while float(a @ c) > 0.93:
        c = near(b, 0.97, rng)
    x = np.vstack([c, base[1:5], a, base[5:], b])  # c first in the pool, a in the middle, b last
    res, _ = run(make_batch(x), threshold=0.95)
    group = [0, 5, len(x) - 1]
    assert res.keep[group].sum() == 1 and res.keep[0]  # c is first in pool order
    for r in (5, len(x) - 1):
        assert f"duplicate of {0:032x}" in res.reason[r] and "group of 3" in res.reason[r]
    assert res.score[5] < 0.95  # a joined through b: its similarity to the kept c is reported
    assert res.keep[1:5].all() and res.keep[6:-1].all()


def test_exact_sha256_duplicates_even_without_embeddings():
    rng = np.random.default_rng(4)
    x = unit(rng.standard_normal((6, D)))
    x[3] = np.nan  # undecodable image: no embedding, but its bytes hash equals row 1's
    sha = ["a" * 64, "b" * 64, "c" * 64, "b" * 64, None, "b" * 64]
    res, _ = run(make_batch(x, sha=sha))
    assert res.keep.tolist() == [True, True, True, False, True, False]
    assert res.reason[3] == f"duplicate of {1:032x} (same sha256; group of 3)"
    assert res.score[3] == 1.0 and res.score[5] == 1.0


def test_same_kept_set_whatever_the_row_order():
    rng = np.random.default_rng(5)
    x, _, _ = planted(2000, 150, rng)
    # add triples to make groups larger than pairs
    for s in range(0, 60, 3):
        x[s + 1] = near(x[s], 0.98, rng)
        x[s + 2] = near(x[s + 1], 0.98, rng)
    uids = [f"{i:032x}" for i in range(len(x))]
    keys = [f"{i:09d}" for i in range(len(x))]
    res1, _ = run(make_batch(x, uids=uids, key=keys))
    res2, _ = run(make_batch(x, uids=uids, key=keys))
    assert res1.keep.tolist() == res2.keep.tolist() and res1.reason == res2.reason
    perm = np.random.default_rng(9).permutation(len(x))
    res3, _ = run(make_batch(x[perm], uids=[uids[p] for p in perm], key=[keys[p] for p in perm],
                             sha=[f"{p:064x}" for p in perm]))
    kept1 = {uids[i] for i in np.flatnonzero(res1.keep)}
    kept3 = {uids[perm[i]] for i in np.flatnonzero(res3.keep)}
    assert kept1 == kept3
    # every reason names a uid that was kept
    for r in res1.reason:
        if r is not None:
            assert re.match(r"duplicate of ([0-9a-f]{32})", r).group(1) in kept1


def test_keep_highest_clip_score():
    rng = np.random.default_rng(6)
    x = unit(rng.standard_normal((5, D)))
    x[2] = near(x[0], 0.99, rng)
    x[4] = near(x[0], 0.98, rng)
    clip = [0.20, 0.5, 0.31, 0.4, 0.30]
    res, _ = run(make_batch(x, clip=clip), keep="highest_clip_score")
    assert res.keep.tolist() == [False, True, True, True, False]
    assert res.reason[0].startswith(f"duplicate of {2:032x}")
    # missing scores lose; all missing -> falls back to first
    res, _ = run(make_batch(x, clip=[None, 0.5, None, 0.4, None]), keep="highest_clip_score")
    assert res.keep.tolist() == [True, True, False, True, False]


def test_on_text_and_both():
    rng = np.random.default_rng(7)
    img = unit(rng.standard_normal((4, D)))
    txt = unit(rng.standard_normal((4, D)))
    img[1] = near(img[0], 0.99, rng)  # same picture, different caption meaning
    txt[2] = near(txt[0], 0.99, rng)  # different picture, same caption meaning
    b = make_batch(img, txt, text=["A cat", "a dog", "a  CAT ", "x"])
    assert run(b, on="image")[0].keep.tolist() == [True, False, True, True]
    assert run(b, on="text")[0].keep.tolist() == [True, True, False, True]
    assert run(b, on="both")[0].keep.tolist() == [True, True, True, True]
    img[3] = near(img[0], 0.99, rng)
    txt[3] = near(txt[0], 0.99, rng)
    assert run(make_batch(img, txt), on="both")[0].keep.tolist() == [True, True, True, False]
    # exact text duplicates (case / whitespace insensitive) without any embedding similarity
    res, _ = run(make_batch(unit(rng.standard_normal((3, D))), unit(rng.standard_normal((3, D))),
                            text=["A cat", "a dog", "a  CAT "]), on="text")
    assert res.keep.tolist() == [True, True, False] and "same caption" in res.reason[2]


def test_below_threshold_is_kept_and_threshold_respected():
    rng = np.random.default_rng(8)
    x = unit(rng.standard_normal((4, D)))
    x[1] = near(x[0], 0.93, rng)
    assert run(make_batch(x), threshold=0.95)[0].keep.all()
    assert run(make_batch(x), threshold=0.9)[0].keep.tolist() == [True, False, True, True]


def test_large_clique_is_one_group():
    """A group bigger than the neighbour count k is still connected and keeps one member."""
    rng = np.random.default_rng(10)
    x = unit(rng.standard_normal((300, D)))
    centre = x[0]
    for r in range(1, 80):
        x[r] = near(centre, 0.995, rng)
    res, _ = run(make_batch(x), neighbors=8)
    assert res.keep[:80].sum() == 1 and res.keep[80:].all()


def test_choose_index_policy():
    assert faiss_index.choose_index(1000).kind == "flat"
    c = faiss_index.choose_index(1_000_000)
    assert c.kind == "ivf" and c.nlist == 2048 and c.nprobe == faiss_index.DEFAULT_NPROBE == 4
    assert faiss_index.choose_index(50, "ivf").nlist == 1
    with pytest.raises(ValueError, match="index must be"):
        faiss_index.choose_index(10, "hnsw")


def test_registered_and_params_validated_by_recipe():
    from curate.filter.recipe import load_filters

    assert load_filters()["dedup"] is DedupFilter


def test_through_the_recipe_runner(tmp_path):
    """dedup + semdedup + knowledge as recipe steps: ledger reasons, text_augmented, outputs reconcile."""
    import textwrap

    import duckdb
    import pyarrow.parquet as pq

    from curate.filter.engine import FilterConfig, filter_pool
    from curate.core.uids import make_uid
    from tests.metadata_factory import write_embeddings, write_metadata

    rng = np.random.default_rng(11)
    n = 40
    uids = [make_uid(f"http://x/{i}.jpg", f"row {i}") for i in range(n)]
    texts = ["salmon sashimi" if i == 7 else f"a dog in the park number {i}" for i in range(n)]
    rows = [{"uid": uids[i], "text": texts[i], "key": f"{i:09d}", "sha256": f"{i:064x}"} for i in range(n)]
    rows[25]["sha256"] = rows[4]["sha256"]  # exact copy of row 4
    rows[30]["status"] = "failed_to_download"
    write_metadata(tmp_path / "pool", rows=rows, n_files=2)
    v = unit(rng.standard_normal((n, 16)))
    v[33] = near(v[12], 0.99, rng)  # near copy of row 12 (float16 storage keeps it > 0.95)
    write_embeddings(tmp_path / "pool", "curate-debug__0123456789ab", dim=16,
                     image_emb={uids[i]: v[i] for i in range(n)})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent("""\
        name: dedup_knowledge
        steps:
          - dedup: {model: curate-debug, threshold: 0.95}
          - semdedup: {model: curate-debug, clusters: 2, eps: 0.01}
          - knowledge: {rare_below: 2}
        """))
    summary = filter_pool(FilterConfig(recipe=str(recipe), pool=str(tmp_path / "pool"), out=str(tmp_path / "out"),
                                       progress=False, report=False))
    assert summary is not None
    con = duckdb.connect()
    dec = con.sql(f"SELECT uid, step, kept, reason FROM read_parquet('{tmp_path / 'out' / 'decisions.parquet'}')"
                  ).to_arrow_table().to_pylist()
    by = {(d["uid"], d["step"].split(".")[-1]): d for d in dec}
    assert not by[(uids[25], "dedup")]["kept"]
    assert by[(uids[25], "dedup")]["reason"].startswith(f"duplicate of {uids[4]} (same sha256")
    assert not by[(uids[33], "dedup")]["kept"] and f"duplicate of {uids[12]}" in by[(uids[33], "dedup")]["reason"]
    subset = pq.read_table(tmp_path / "out" / "subset.parquet").to_pandas()
    assert len(subset) == n - 3  # failed row, exact copy, near copy
    assert set(subset.uid) == set(uids) - {uids[25], uids[30], uids[33]}
    row7 = subset[subset.uid == uids[7]].iloc[0]
    assert row7.text == "salmon sashimi"
    assert row7.text_augmented.startswith("salmon sashimi. ") and "sashimi: very thinly sliced raw fish" in row7.text_augmented
    other = subset[subset.uid != uids[7]]
    assert (other.text_augmented == other.text).all()  # "dog", "park": common in this pool


def test_collapsed_embeddings_are_warned_about(caplog):
    rng = np.random.default_rng(12)
    centre = unit(rng.standard_normal(D))
    x = np.stack([near(centre, 0.97, rng) for _ in range(200)])  # every pair ~0.94: an untrained model
    with caplog.at_level("WARNING"):
        run(make_batch(x))
    assert "median cosine between random rows" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        run(make_batch(unit(rng.standard_normal((200, D)))))
    assert "median cosine" not in caplog.text


def test_ivf_self_join_matches_plain_faiss_search():
    """The preassigned, list-by-list (BLAS) IVF self-search returns what index.search returns."""
    rng = np.random.default_rng(13)
    x, _, _ = planted(faiss_index.BIG_BATCH_MIN + 5000, 200, rng)
    i, j, s, choice = faiss_index.near_pairs(x, 0.95, index="ivf", k=8)
    index = faiss_index.build_index(x, choice, seed=0)
    sims, ids = index.search(x, 8)
    rows = np.repeat(np.arange(len(x)), 8)
    ok = (ids.ravel() >= 0) & (ids.ravel() != rows) & (sims.ravel() >= 0.95)
    ref = set(zip(np.minimum(rows[ok], ids.ravel()[ok]).tolist(), np.maximum(rows[ok], ids.ravel()[ok]).tolist()))
    assert set(zip(i.tolist(), j.tolist())) == ref and len(ref) >= 198


def test_gpu_index_is_used_when_faiss_sees_a_gpu(monkeypatch):
    """No GPU here: fake faiss-gpu's two entry points and check the index goes through them."""
    import faiss

    moved = []
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: "gpu-resources", raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda res, dev, index: moved.append((res, dev)) or index,
                        raising=False)
    faiss_index._gpu_resources.cache_clear()
    try:
        rng = np.random.default_rng(14)
        x, src, dst = planted(2000, 20, rng)
        i, j, _, choice = faiss_index.near_pairs(x, 0.95)
        assert choice.gpu and choice.describe() == "flat (exact, gpu)"
        assert moved == [("gpu-resources", 0)]
        assert set(zip(i.tolist(), j.tolist())) == {(min(a, b), max(a, b)) for a, b in zip(src, dst)}
    finally:
        faiss_index._gpu_resources.cache_clear()


# ---------------------------------------------------------------- memory-bounded paths (issue 20, item 4)

def test_unit_rows_read_exactly_what_normalise_returns():
    """The rows normalised as they are read equal filters.common.normalise's copy bit for bit, NaN and zero rows
    included, for slices, index arrays, subsets and float16 input."""
    from filters.common import normalise

    rng = np.random.default_rng(20)
    raw = (rng.standard_normal((500, D)) * rng.uniform(0.1, 5, (500, 1))).astype(np.float32)
    raw[3], raw[7] = np.nan, 0.0
    for x in (raw, raw.astype(np.float16)):
        ref, ok = normalise(x)
        rows = faiss_index.UnitRows(x)
        assert np.array_equal(rows.ok, ok)
        assert np.array_equal(rows[:], ref) and np.array_equal(rows[10:20], ref[10:20])
        idx = np.array([7, 3, 499, 0, 0])
        assert np.array_equal(rows[idx], ref[idx])
        sub = rows.subset(np.flatnonzero(ok)[::3])
        assert len(sub) == len(np.flatnonzero(ok)[::3]) and np.array_equal(sub[:], ref[ok][::3])
        assert np.array_equal(sub.subset([1, 0])[:], ref[ok][::3][[1, 0]])
        got = np.concatenate([block for _, _, block in rows.chunks(64)])
        assert np.array_equal(got, ref)
    # collapse statistics read the same sample through it
    from curate.lib import collapse

    assert collapse.collapse_stats(faiss_index.UnitRows(raw).subset(np.flatnonzero(ok))) == \
        collapse.collapse_stats(normalise(raw)[0][ok])


def test_ivf_self_knn_equals_a_filled_index_searched_by_big_batch_search():
    """The self-join reading each cell's members from the caller's matrix returns what the previous method
    (an IndexIVFFlat holding a copy of every vector, searched by faiss.contrib.big_batch_search with the
    same cell assignment) returns: the same neighbours at the same similarities."""
    from faiss.contrib.big_batch_search import big_batch_search

    rng = np.random.default_rng(21)
    x, _, _ = planted(4000, 50, rng)
    choice = faiss_index.choose_index(len(x), "ivf")
    assert choice.nlist > 16
    sims, ids = faiss_index.ivf_self_knn(x, choice, 8, seed=0)
    index = faiss_index.build_index(x, choice, seed=0)
    assign = faiss_index.assign_cells(index, x, choice.nprobe)
    ref_d, ref_i = big_batch_search(index, x, 8, method="pairwise_distances", q_assign=assign)
    assert np.array_equal(ids, ref_i) and np.array_equal(sims, ref_d)


def test_chunked_reads_give_the_same_decisions(monkeypatch):
    """Dedup on an IVF-sized planted set with tiny read chunks decides exactly as with the default chunks:
    same kept rows, scores and reasons; the planted pairs found (recall >= 0.99), nothing else dropped."""
    rng = np.random.default_rng(22)
    x, src, dst = planted(faiss_index.BIG_BATCH_MIN + 1000, 150, rng)
    x = x * rng.uniform(0.5, 2.0, (len(x), 1)).astype(np.float32)  # not unit length: normalised as read
    x[5] = np.nan
    batch = make_batch(x)
    ref, f = run(batch, threshold=0.95)
    assert f.last_index.kind == "ivf"
    monkeypatch.setattr(faiss_index, "ROW_CHUNK", 1000)
    got, _ = run(batch, threshold=0.95)
    assert np.array_equal(got.keep, ref.keep) and list(got.reason) == list(ref.reason)
    assert np.array_equal(got.score, ref.score, equal_nan=True)
    keep = ref.keep
    assert np.mean([keep[a] != keep[b] for a, b in zip(src, dst) if 5 not in (a, b)]) >= 0.99  # IVF recall
    planted_rows = set(src.tolist()) | set(dst.tolist())
    assert {int(r) for r in np.flatnonzero(~keep)} <= planted_rows
