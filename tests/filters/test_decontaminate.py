"""filters/decontaminate.py: evaluation images (folders and webdataset shards) removed from the pool."""

from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from curate.core.errors import CurateError
from filters.base import Batch
from filters.decontaminate import DecontaminateFilter


def picture(seed: int, size: int = 48) -> Image.Image:
    """A random blocky picture: distinct seeds give clearly different images."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.NEAREST)


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def pixel_embed(im: Image.Image) -> np.ndarray:
    """Stand-in for a CLIP image tower: 12x12 RGB, centred, L2-normalised (robust to resizing)."""
    a = np.asarray(im.convert("RGB").resize((12, 12), Image.BILINEAR), dtype=np.float32).ravel()
    a -= a.mean()
    return a / np.linalg.norm(a)


class Embedder:
    def __init__(self):
        self.calls = 0

    def __call__(self, paths):
        self.calls += 1
        out = []
        for p in paths:
            with Image.open(p) as im:
                out.append(pixel_embed(im))
        return np.stack(out)


@pytest.fixture
def evalsets(tmp_path):
    root = tmp_path / "evalsets"
    (root / "emoji_category" / "images").mkdir(parents=True)
    for i in range(5):
        picture(100 + i).save(root / "emoji_category" / "images" / f"{i}.png")
    (root / "emoji_category" / "classnames.txt").write_text("a\nb\n")
    (root / "emoji_category" / "images" / "broken.png").write_bytes(b"not a png")
    # DataComp / clip_benchmark layout: webdataset shard with image members (one with a hostile name)
    shard = root / "cars" / "test" / "0.tar"
    shard.parent.mkdir(parents=True)
    with tarfile.open(shard, "w") as tf:
        for name, seed in [("s0000.png", 200), ("s0000.cls", None), ("../../escaped.png", 201)]:
            data = png_bytes(picture(seed)) if seed is not None else b"3"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return root


def pool_batch(tmp_path, evalsets):
    """30 unrelated pool images + a resized copy of eval 0, a byte copy of eval 3, a copy of a shard image."""
    ims = [picture(i) for i in range(30)]
    ims.append(picture(100).resize((80, 80), Image.BILINEAR))  # row 30: near copy of images/0.png
    exact = (evalsets / "emoji_category" / "images" / "3.png").read_bytes()
    ims.append(Image.open(io.BytesIO(exact)))  # row 31: exact bytes of images/3.png
    ims.append(picture(201))  # row 32: the shard member with the hostile name
    shas = [hashlib.sha256(png_bytes(im)).hexdigest() for im in ims]
    shas[31] = hashlib.sha256(exact).hexdigest()
    emb = np.stack([pixel_embed(im) for im in ims])
    emb[31] = np.nan  # even without an embedding, the sha256 match removes it
    table = pa.table({"uid": [f"{i:032x}" for i in range(len(ims))], "sha256": shas})
    return Batch(table, image_emb=emb)


def test_removes_eval_copies_from_folders_and_shards(tmp_path, evalsets):
    f = DecontaminateFilter(DecontaminateFilter.Params(evalsets=str(evalsets), threshold=0.9))
    emb = Embedder()
    cache = tmp_path / "cache"
    f.setup({"cache_dir": str(cache), "embed_image_paths": emb, "model_id": "m1"})
    labels = sorted(im.label for im in f.images)
    assert len(labels) == 7 and "cars/test/0.tar:s0000.png" in labels
    assert f.skipped == ["emoji_category/images/broken.png"]
    # the hostile member was extracted under a generated name inside the cache only
    assert not (tmp_path / "escaped.png").exists() and not (evalsets / "escaped.png").exists()
    assert all(cache in im.path.parents or evalsets in im.path.parents for im in f.images)

    res = f.apply(pool_batch(tmp_path, evalsets))
    assert res.keep[:30].all()
    assert not res.keep[30] and "emoji_category/images/0.png" in res.reason[30]
    assert not res.keep[31] and res.reason[31] == "exact copy of eval image emoji_category/images/3.png (same sha256)"
    assert not res.keep[32] and "cars/test/0.tar:../../escaped.png" in res.reason[32]
    assert res.score[30] >= 0.9 and np.nanmax(res.score[:30]) < 0.9
    assert res.threshold == 0.9

    # second setup: embeddings come from the cache, the embedder is not called again
    f2 = DecontaminateFilter(DecontaminateFilter.Params(evalsets=str(evalsets)))
    f2.setup({"cache_dir": str(cache), "embed_image_paths": emb, "model_id": "m1"})
    assert emb.calls == 1
    assert f2.apply(pool_batch(tmp_path, evalsets)).keep.tolist() == res.keep.tolist()


def test_relative_path_resolves_next_to_recipe(tmp_path, evalsets):
    f = DecontaminateFilter(DecontaminateFilter.Params(evalsets="evalsets/emoji_category"))
    f.setup({"cache_dir": str(tmp_path / "c"), "embed_image_paths": Embedder(), "recipe_dir": str(tmp_path)})
    assert len(f.images) == 5


def test_clear_errors(tmp_path, evalsets):
    f = DecontaminateFilter(DecontaminateFilter.Params(evalsets=str(tmp_path / "missing")))
    with pytest.raises(CurateError, match="missing"):
        f.setup({"cache_dir": str(tmp_path / "c"), "embed_image_paths": Embedder()})
    (tmp_path / "empty").mkdir()
    f = DecontaminateFilter(DecontaminateFilter.Params(evalsets=str(tmp_path / "empty")))
    with pytest.raises(CurateError, match="no readable images"):
        f.setup({"cache_dir": str(tmp_path / "c"), "embed_image_paths": Embedder()})
    f = DecontaminateFilter(DecontaminateFilter.Params(evalsets=str(evalsets)))
    with pytest.raises(CurateError, match="image model"):
        f.setup({"cache_dir": str(tmp_path / "c")})
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.tar").write_bytes(b"garbage, not a tar")
    f = DecontaminateFilter(DecontaminateFilter.Params(evalsets=str(bad)))
    with pytest.raises(CurateError, match="x.tar"):
        f.setup({"cache_dir": str(tmp_path / "c"), "embed_image_paths": Embedder()})
