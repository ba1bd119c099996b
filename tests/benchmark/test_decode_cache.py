"""The evaluation decode cache (benchmark/decode_cache.py): exact results with and without it, a second
evaluation that decodes nothing, damaged or mismatched entries never trusted, and the LRU byte budget."""

from __future__ import annotations

import io
import json
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from benchmark import decode_cache as D
from benchmark import evalsets as E
from benchmark.evaluate import EvalConfig, encode_images, evaluate, read_results, zero_shot_classifier
from benchmark.tasks import TASKS, get_task
from curate.clip.models import load_model

ARCH = "curate-debug"
TASK = "vtab/svhn"  # any classification task; the set below is written in its folder


def _png(rgb, size) -> bytes:
    rng = np.random.default_rng(sum(rgb) + size[0])
    a = np.clip(np.asarray(rgb)[None, None] + rng.integers(-40, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _write_set(root, n=30, shift=0):
    colors = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
    samples = [{"__key__": f"{i:04d}", "png": _png(tuple(v + shift for v in colors[i % 3]), (17 + i % 5, 23 + i % 7)),
                "cls": str(i % 3)} for i in range(n)]
    samples.insert(5, {"__key__": "corrupt", "png": b"\x89PNG\r\n\x1a\ngarbage", "cls": "0"})
    E.write_evalset(root / TASKS[TASK].folder, samples, ["red", "green", "blue"], ["a {c} square.", "{c}."],
                    shard_size=12, build_info={"fingerprint": f"test-{shift}"})
    return E.open_evalset(get_task(TASK), root)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return load_model(ARCH, None, "cpu")


def _no_decode(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("decoded an image on a cache hit")

    monkeypatch.setattr(E, "decode_image", refuse)


def test_split_preprocess_is_bit_identical_to_the_model_transform(lm):
    split = D.split_preprocess(lm.preprocess)
    assert split is not None and [s["op"] for s in split.spec["steps"]] == ["Resize", "CenterCrop", "ConvertMode"]
    rng = np.random.default_rng(1)
    for size in [(17, 23), (64, 64), (300, 41)]:
        img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        u8 = split.to_uint8(img)
        assert u8.dtype == torch.uint8
        assert torch.equal(split.normalise(u8[None])[0], lm.preprocess(img))
    # a transform that does not end in ToTensor + Normalize is not split (so never cached)
    from torchvision import transforms as T

    assert D.split_preprocess(T.Compose([T.Resize(8), T.ToTensor()])) is None
    assert D.split_preprocess(T.Compose([T.RandomCrop(8), T.ToTensor(), T.Normalize((0.5,), (0.5,))])) is None


def test_cache_gives_equal_results_and_a_hit_decodes_nothing(lm, tmp_path, monkeypatch):
    es = _write_set(tmp_path / "ev")
    cache = D.DecodeCache(tmp_path / "cache", 1 << 30)
    off = encode_images(lm, es, 8, 0, False)
    cold = encode_images(lm, es, 8, 0, False, cache)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1 == len(list((tmp_path / "cache").glob("*.json")))
    _no_decode(monkeypatch)
    warm = encode_images(lm, es, 8, 0, False, cache)
    for enc in (cold, warm):
        assert enc["keys"] == off["keys"] and enc["failed"] == off["failed"] and enc["total"] == off["total"] == 31
        assert np.array_equal(enc["labels"], off["labels"])
        assert torch.allclose(enc["features"], off["features"], atol=1e-6, rtol=0)
        W = zero_shot_classifier(lm, es.classnames, es.templates)
        assert torch.equal((enc["features"] @ W).argmax(1), (off["features"] @ W).argmax(1))
    assert [f["key"] for f in warm["failed"]] == ["corrupt"]


def test_evaluate_end_to_end_with_and_without_the_cache(lm, tmp_path, monkeypatch):
    from tests.run_factory import random_checkpoint

    _write_set(tmp_path / "ev")
    ckpt = random_checkpoint(tmp_path / "m.pt", 0, ARCH)
    common = dict(model=ARCH, pretrained=str(ckpt), tasks=[TASK], evalsets=tmp_path / "ev", batch_size=8,
                  num_workers=0, progress=False)
    evaluate(EvalConfig(out=tmp_path / "off.jsonl", decode_cache="off", **common))
    assert not (tmp_path / "cache").exists()
    evaluate(EvalConfig(out=tmp_path / "cold.jsonl", decode_cache=tmp_path / "cache", **common))
    _no_decode(monkeypatch)
    evaluate(EvalConfig(out=tmp_path / "warm.jsonl", decode_cache=tmp_path / "cache", **common))
    recs = [read_results(tmp_path / f"{k}.jsonl")[TASK] for k in ("off", "cold", "warm")]
    for r in recs[1:]:
        assert r["evalset_fingerprint"] == recs[0]["evalset_fingerprint"] and r["n_failed"] == 1
        for name, v in recs[0]["metrics"].items():
            assert r["metrics"][name] == pytest.approx(v, abs=1e-6)
    import pyarrow.parquet as pq

    preds = [pq.read_table(tmp_path / f"{k}.items" / "vtab--svhn.parquet").column("pred").to_pylist()
             for k in ("off", "cold", "warm")]
    assert preds[0] == preds[1] == preds[2]


def _entry_files(folder):
    (npy,) = folder.glob("*.npy")
    return npy, npy.with_suffix(".json")


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_sidecar", "bad_sidecar", "short_list"])
def test_a_damaged_entry_is_ignored_and_rebuilt(lm, tmp_path, damage):
    es = _write_set(tmp_path / "ev", n=12)
    cache = D.DecodeCache(tmp_path / "cache", 1 << 30)
    ref = encode_images(lm, es, 8, 0, False, cache)
    npy, side = _entry_files(tmp_path / "cache")
    if damage == "flip":
        b = bytearray(npy.read_bytes())
        b[-100] ^= 0xFF
        npy.write_bytes(bytes(b))
    elif damage == "truncate":
        npy.write_bytes(npy.read_bytes()[:-1000])
    elif damage == "no_sidecar":
        side.unlink()
    elif damage == "bad_sidecar":
        side.write_text("{not json")
    else:
        info = json.loads(side.read_text())
        info["labels"] = info["labels"][:-1]
        side.write_text(json.dumps(info))
    parts = D.entry_key_parts(TASK, es.root, es.shards, D.split_preprocess(lm.preprocess).spec)
    assert cache.get(parts) is None
    again = encode_images(lm, es, 8, 0, False, cache)  # decodes again and rewrites the entry
    assert torch.equal(again["features"], ref["features"]) and again["keys"] == ref["keys"]
    assert cache.get(parts) is not None


def test_a_changed_set_or_preprocessing_never_reuses(lm, tmp_path):
    es = _write_set(tmp_path / "ev", n=12)
    spec = D.split_preprocess(lm.preprocess).spec
    cache = D.DecodeCache(tmp_path / "cache", 1 << 30)
    encode_images(lm, es, 8, 0, False, cache)
    parts = D.entry_key_parts(TASK, es.root, es.shards, spec)
    assert cache.get(parts) is not None
    # another image size, another mean: other keys
    other = json.loads(json.dumps(spec))
    other["mean"] = [0.5, 0.5, 0.5]
    assert cache.get(D.entry_key_parts(TASK, es.root, es.shards, other)) is None
    # the same folder rebuilt with other pixels: the shard signatures and build fingerprint change
    time.sleep(0.01)
    es2 = _write_set(tmp_path / "ev", n=12, shift=5)
    parts2 = D.entry_key_parts(TASK, es2.root, es2.shards, spec)
    assert D.entry_key(parts2) != D.entry_key(parts) and cache.get(parts2) is None
    # a sidecar whose key parts differ from the ones asked for (a hash collision, a hand-copied file) is not used
    _, side = cache.paths(D.entry_key(parts))
    info = json.loads(side.read_text())
    info["key_parts"]["task"] = "other"
    side.write_text(json.dumps(info))
    assert cache.get(parts) is None


def _fill(cache, name, n=4, shape=(3, 8, 8)):
    parts = {"format": D.FORMAT, "task": name}
    w = cache.writer(parts, n, shape)
    if w is None:
        return None
    w.add(torch.full((n, *shape), 7, dtype=torch.uint8), [f"k{i}" for i in range(n)], [0] * n, [True] * n,
          [None] * n, [[]] * n, [None] * n)
    assert w.commit()
    return parts


def test_lru_eviction_keeps_the_folder_in_budget(tmp_path):
    one = 4 * 3 * 8 * 8
    probe = D.DecodeCache(tmp_path / "probe", 1 << 20)
    _fill(probe, "probe")
    entry_bytes = sum(b for _, b, _ in probe.entries())
    cache = D.DecodeCache(tmp_path / "c", int(entry_bytes * 2.5))
    a, b = _fill(cache, "a"), _fill(cache, "b")
    old = time.time() - 100
    for i, p in enumerate((a, b)):
        os.utime(cache.paths(D.entry_key(p))[1], (old + i, old + i))
    assert cache.get(a) is not None  # a hit makes `a` the most recent
    c = _fill(cache, "c")
    assert cache.get(b) is None and cache.get(a) is not None and cache.get(c) is not None
    assert sum(bt for _, bt, _ in cache.entries()) <= cache.max_bytes
    # an entry larger than the whole budget is not written
    assert D.DecodeCache(tmp_path / "small", one // 2).writer({"task": "x"}, 4, (3, 8, 8)) is None
    # a writer that gets fewer images than it was opened for publishes nothing
    w = cache.writer({"task": "short"}, 4, (3, 8, 8))
    w.add(torch.zeros((2, 3, 8, 8), dtype=torch.uint8), ["a", "b"], [0, 0], [True, True], [None] * 2, [[]] * 2,
          [None] * 2)
    assert not w.commit() and cache.get({"task": "short"}) is None
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(".tmp-")]


def test_settings_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(D.ENV_DIR, raising=False)
    monkeypatch.delenv(D.ENV_BYTES, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert D.default_dir() == tmp_path / "xdg" / "curate" / "eval"
    c = D.DecodeCache.from_settings()
    assert c.folder == tmp_path / "xdg" / "curate" / "eval" and c.max_bytes == D.DEFAULT_MAX_BYTES
    monkeypatch.setenv(D.ENV_DIR, str(tmp_path / "mine"))
    monkeypatch.setenv(D.ENV_BYTES, "12345")
    c = D.DecodeCache.from_settings()
    assert c.folder == tmp_path / "mine" and c.max_bytes == 12345
    assert D.DecodeCache.from_settings(max_bytes=0) is None
    assert D.DecodeCache.from_settings("off") is None
    monkeypatch.setenv(D.ENV_DIR, "off")
    assert D.DecodeCache.from_settings() is None
    monkeypatch.setenv(D.ENV_BYTES, "lots")
    from curate.core.errors import CurateError

    with pytest.raises(CurateError, match=D.ENV_BYTES):
        D.default_max_bytes()
