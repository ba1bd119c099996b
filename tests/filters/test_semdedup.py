"""filters/semdedup.py: SemDeDup as in the paper, checked against a brute-force reference."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from filters.base import Batch
from filters.semdedup import SemDedupFilter, max_sim_to_earlier

D = 32


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def batch(x):
    n = len(x)
    return Batch(pa.table({"uid": [f"{i:032x}" for i in range(n)]}), image_emb=np.asarray(x, np.float32))


def run(x, seed=0, **params):
    f = SemDedupFilter(SemDedupFilter.Params(**params))
    f.setup({"seed": seed})
    return f.apply(batch(x)), f


def reference_one_cluster(x, eps, closest_first=True):
    """The paper's rule written naively for a single cluster."""
    c = x.mean(0)
    c /= np.linalg.norm(c)
    d = x @ c
    order = sorted(range(len(x)), key=lambda i: (-d[i] if closest_first else d[i], i))
    keep = np.ones(len(x), bool)
    for pos, j in enumerate(order):
        for i in order[:pos]:
            if float(x[i] @ x[j]) > 1 - eps:
                keep[j] = False
                break
    return keep


def test_matches_bruteforce_reference_single_cluster():
    rng = np.random.default_rng(0)
    base = unit(rng.standard_normal((40, D)))
    # near-duplicate families at various similarities around the 0.95 threshold
    x = [base]
    for s in range(20):
        x.append(unit(base[s] + rng.uniform(0.05, 0.5) * rng.standard_normal(D) / np.sqrt(D)))
    x = np.vstack(x)
    for eps in (0.02, 0.05, 0.1):
        for keep in ("closest_to_centroid", "farthest_from_centroid"):
            res, _ = run(x, clusters=1, eps=eps, keep=keep)
            ref = reference_one_cluster(x, eps, keep == "closest_to_centroid")
            assert res.keep.tolist() == ref.tolist(), (eps, keep)
            assert res.threshold == 1 - eps


def test_keeps_member_closest_to_centroid_of_each_group():
    rng = np.random.default_rng(1)
    centres = unit(rng.standard_normal((5, D)))
    x, groups = [], []
    for c in centres:
        for _ in range(6):  # 6 distinct items per cluster ...
            item = unit(c + 0.6 * rng.standard_normal(D))
            members = [len(x) + t for t in range(3)]
            for _ in range(3):  # ... each present as 3 near-identical copies
                x.append(unit(item + 0.02 * rng.standard_normal(D)))
            groups.append(members)
    x = np.vstack(x)
    res, f = run(x, clusters=5, eps=0.05)
    assert f.n_clusters == 5
    assert res.keep.sum() == 30
    for members in groups:
        assert res.keep[members].sum() == 1
        # the survivor is the copy most similar to the group's centroid among its cluster
    # reasons name a uid of the same group
    for members in groups:
        for r in members:
            if not res.keep[r]:
                named = int(res.reason[r].split()[3], 16)
                assert named in members and res.score[r] > 0.95


def test_deterministic_and_rows_without_embedding_kept():
    rng = np.random.default_rng(2)
    x = unit(rng.standard_normal((300, D)))
    x[100:150] = unit(x[:50] + 0.01 * rng.standard_normal((50, D)))
    x[7] = np.nan
    a, _ = run(x, clusters=4)
    b, _ = run(x, clusters=4)
    assert a.keep.tolist() == b.keep.tolist() and a.reason == b.reason
    assert a.keep[7] and np.isnan(a.score[7])
    assert (~a.keep).sum() >= 45  # nearly all planted copies fall in their original's cluster


def test_eps_zero_removes_nothing_distinct():
    rng = np.random.default_rng(3)
    x = unit(rng.standard_normal((200, D)))
    res, _ = run(x, eps=0.0)
    assert res.keep.all()


def test_max_sim_to_earlier_blocks(monkeypatch):
    import filters.semdedup as sd

    rng = np.random.default_rng(4)
    x = unit(rng.standard_normal((57, D)))
    full = x @ x.T
    monkeypatch.setattr(sd, "BLOCK_ELEMENTS", 57 * 3)  # force many blocks
    best, arg = max_sim_to_earlier(x)
    for j in range(1, 57):
        assert np.isclose(best[j], full[:j, j].max()) and arg[j] == full[:j, j].argmax()
    assert best[0] == -np.inf
