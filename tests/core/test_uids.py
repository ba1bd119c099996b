"""The uid contract: stable hex uids and DataComp's uids.npy format."""

import numpy as np
import pytest

from curate.core import uids
from curate.core.errors import CurateError


def test_uid_is_stable_hex_and_field_separated():
    u = uids.make_uid("http://x/a.png", "a cat")
    assert u == uids.make_uid("http://x/a.png", "a cat")
    assert uids.is_uid(u)
    assert uids.make_uid("ab", "c") != uids.make_uid("a", "bc")
    assert uids.make_uid("http://x/a.png", "a cat") != uids.make_uid("http://x/a.png", "a dog")


def test_round_trip_sorted_and_duplicates_kept(tmp_path):
    us = [uids.make_uid(f"http://x/{i}", str(i)) for i in range(200)]
    us += us[:5]  # duplicates = upsampling
    path = tmp_path / "uids.npy"
    uids.save(path, us)
    back = uids.decode(uids.load(path))
    assert back == sorted(us)  # hex order of fixed-width hex equals 128-bit numeric order
    assert len(back) == 205


def test_sort_order_is_128_bit_numeric_order():
    us = ["ffffffffffffffff0000000000000000", "0000000000000001ffffffffffffffff",
          "00000000000000010000000000000002", "8000000000000000000000000000000f"]
    arr = uids.encode(us)
    nums = [int(u, 16) for u in uids.decode(arr)]
    assert nums == sorted(int(u, 16) for u in us)


def test_file_loads_with_plain_numpy_as_datacomp_expects(tmp_path):
    us = [uids.make_uid(f"http://x/{i}", "t") for i in range(10)]
    uids.save(tmp_path / "u.npy", us)
    arr = np.load(tmp_path / "u.npy")
    assert arr.dtype == np.dtype("u8,u8")
    # DataComp's resharder parses hex uids this way and searches the sorted array.
    key = np.array([(int(us[3][:16], 16), int(us[3][16:], 16))], dtype="u8,u8")
    i = np.searchsorted(arr, key)[0]
    assert arr[i] == key[0]


@pytest.mark.parametrize("bad", ["xyz", "ABCDEF0123456789ABCDEF0123456789", "0" * 31, None])
def test_non_hex_uid_rejected(bad):
    with pytest.raises(CurateError, match="32 lowercase hex"):
        uids.encode(["0" * 32, bad])


def test_load_rejects_wrong_dtype_and_unsorted(tmp_path):
    np.save(tmp_path / "f.npy", np.arange(4))
    with pytest.raises(CurateError, match="dtype"):
        uids.load(tmp_path / "f.npy")
    arr = np.array([(2, 0), (1, 0)], dtype="u8,u8")
    np.save(tmp_path / "u.npy", arr)
    with pytest.raises(CurateError, match="not sorted"):
        uids.load(tmp_path / "u.npy")
    with pytest.raises(CurateError, match="no such file"):
        uids.load(tmp_path / "missing.npy")


def test_atomic_outputs_have_ordinary_permissions(tmp_path):
    import stat

    from curate.core import atomic

    atomic.write_text(tmp_path / "a.json", "{}")
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~atomic._UMASK
    assert not list(tmp_path.glob(".tmp-*"))


def test_write_subset_rewrites_only_when_the_uids_change(tmp_path):
    """A code-chosen subset (a control, a scorer's training set) keeps its files, and so the reshard and runs built
    on it, when re-written with the same uids in any order; a changed list or a damaged manifest is rewritten."""
    import json

    from curate.core import uids as uidlib

    a, b, c = (uidlib.make_uid(f"http://x/{i}.jpg", str(i)) for i in range(3))
    sub = tmp_path / "sub"
    assert uidlib.write_subset(sub, [b, a], {"recipe": {"name": "t"}})
    first = json.loads((sub / "manifest.json").read_text())
    assert uidlib.decode(uidlib.load(sub / "uids.npy")) == sorted([a, b])
    assert first["recipe"] == {"name": "t"} and len(first["uids_digest"]) == 64
    assert not uidlib.write_subset(sub, [a, b], {"recipe": {"name": "t"}})
    assert uidlib.write_subset(sub, [a, b, c], {"recipe": {"name": "t"}})
    assert json.loads((sub / "manifest.json").read_text())["uids_digest"] != first["uids_digest"]
    (sub / "manifest.json").write_text("{not json")
    assert uidlib.write_subset(sub, [a, b, c], {"recipe": {"name": "t"}})
    assert len(uidlib.load(sub / "uids.npy")) == 3
