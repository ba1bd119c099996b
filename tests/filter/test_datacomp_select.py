"""The streaming cut and the on-disk bucket sort behind `curate pool select-datacomp`.

The end-to-end byte equality with `curate filter` is in test_datacomp_pool.py; its fixture is small
enough that the cut bin is always collected after one pass. Here the collect limit is lowered so
every branch of the radix select runs (several passes, a bin that is one value), against np.sort."""

from __future__ import annotations

import numpy as np
import pytest

from curate.filter import datacomp_select as ds


def _select(values: np.ndarray, rank: int, chunks: int = 3) -> ds.Cut:
    parts = np.array_split(values, chunks)
    files = list(range(chunks))
    sel = ds.RadixSelect(lambda f: iter([parts[f][: len(parts[f]) // 2], parts[f][len(parts[f]) // 2:]]),
                         files, values.dtype)
    assert sel.total == len(values)
    return sel.select(rank)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("collect_max", [0, 5, 1 << 20])
def test_radix_select_matches_a_sort(dtype, collect_max, monkeypatch):
    monkeypatch.setattr(ds, "COLLECT_MAX", collect_max)
    rng = np.random.default_rng(0)
    vals = np.concatenate([rng.normal(0.25, 0.05, 3000), np.full(200, 0.3125), [-0.0, 0.0, -1e-30, np.inf, -np.inf],
                           rng.uniform(-1, 1, 500)]).astype(dtype)
    rng.shuffle(vals)
    ordered = np.sort(vals)
    for rank in [0, 1, len(vals) // 3, int(np.searchsorted(ordered, dtype(0.3125))), len(vals) - 1,
                 *rng.integers(0, len(vals), 20)]:
        cut = _select(vals, int(rank))
        want = ordered[rank]
        assert cut.value == want, rank
        assert cut.n_greater == int((vals > want).sum()) and cut.n_at_least == int((vals >= want).sum())


def test_order_keys_preserve_float_order():
    x = np.array([-np.inf, -2.5, -1e-30, -0.0, 0.0, 1e-30, 0.5, np.inf], np.float32)
    k = ds.order_keys(x)
    assert (np.diff(k.astype(np.int64)) >= 0).all() and k[3] == k[4]  # -0.0 == 0.0 as floats, so as keys
    for v, key in zip(x, k):
        assert ds._key_value(int(key), np.dtype(np.float32)) == v


def test_buckets_write_the_same_bytes_as_np_save(tmp_path, monkeypatch):
    import io

    from curate.core.uids import UID_DTYPE

    rng = np.random.default_rng(1)
    uids = np.empty(5000, UID_DTYPE)
    uids["f0"] = rng.integers(0, 2**63, 5000, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    uids["f1"] = rng.integers(0, 2**63, 5000, dtype=np.uint64)
    uids["f0"][:50] = uids["f0"][50]  # a run of equal first halves: ordered by the second
    b = ds._Buckets(tmp_path / ".tmp-x.buckets")
    for part in np.array_split(uids, 7):
        b.add(part)
    fh = io.BytesIO()
    b.write_sorted_npy(fh)
    b.close()
    want = io.BytesIO()
    np.save(want, np.sort(uids, order=["f0", "f1"]))
    assert fh.getvalue() == want.getvalue()
    assert not (tmp_path / ".tmp-x.buckets").exists()
