"""Hostile input: nothing escapes its folder, nothing is executed, nothing exhausts memory.

Already covered elsewhere (not repeated here): download of file:// / ftp:// URLs and PNG bombs
(tests/pool/test_download.py), unsafe tar member names in pool_io (tests/embed/test_embed.py), unsafe bundle
tarballs (tests/benchmark/test_submit.py), !!python tags in a recipe step (tests/filter/test_recipe.py). Here: the
other URL schemes, captions with control characters and 1 MB length carried byte-exact from
download through filter and reshard, hostile member names in a pool shard given to reshard, a bomb
image inside a pool shard given to embed, non-hex uids in pool metadata, and YAML alias bombs.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.pool.download_input import url_problem
from curate.core.errors import CurateError
from tests.pool_factory import bomb_png, make_pool

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- URL schemes


@pytest.mark.parametrize("url", [
    "file:///etc/passwd", "FILE:///etc/passwd", "File://localhost/etc/shadow", "ftp://example.com/a.png",
    "gopher://example.com/1", "javascript:alert(1)", "data:image/png;base64,iVBORw0KGgo=", "jar:http://x/a!/b",
    "s3://bucket/key.jpg", "//example.com/no-scheme.jpg", "/etc/passwd", "../../etc/passwd", "http:/one-slash",
    "http://", "https://:80/x", "http://127.0.0.1:99999/x", " http://example.com/a.jpg",
    "http://example.com/a b.jpg", "http://exa\x00mple.com/a.jpg", "http://example.com/\r\nX-Injected: 1",
])
def test_only_http_urls_with_a_host_are_downloaded(url):
    assert url_problem(url) is not None


@pytest.mark.parametrize("url", ["http://example.com/a.jpg", "HTTPS://EXAMPLE.com/a.jpg", "http://127.0.0.1:8/x?y=1"])
def test_ordinary_http_urls_pass(url):
    assert url_problem(url) is None


# ---------------------------------------------------------------- captions, end to end

HOSTILE_CAPTIONS = [
    "a red cat\x00 with a NUL byte in the middle",
    "ANSI \x1b[31mred\x1b[0m escape and a bell \x07 and backspace \x08 in a dog photo",
    "line one of a house\r\nline two\ttabbed\x0bvertical\x0cform",
    "right-to-left \u202egnp.exe\u202c override, zero width \u200b joiner \ufeff bom, a tree",
    "emoji 🐱‍👤 and astral 𝕏 and combining e\u0301 on a boat",
]
HUGE_CAPTION = "a big flower " + "word " * 209_713  # ~1 MB


def _png(seed: int, side: int = 24) -> bytes:
    a = (np.random.RandomState(seed).rand(side, side, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_hostile_captions_survive_byte_exact_from_download_to_reshard(tmp_path, serve_dir):
    _captions_end_to_end(tmp_path, serve_dir, HOSTILE_CAPTIONS)


def test_a_1mb_caption_is_stored_whole_and_the_pool_verifies(tmp_path, serve_dir):
    """Found by this suite: the downloader puts the caption in the sample json and pool_verify refused json over
    1 MiB, so such a pool failed verification forever (fixed: the json cap is pool_io's member cap)."""
    _captions_end_to_end(tmp_path, serve_dir, HOSTILE_CAPTIONS[:1] + [HUGE_CAPTION])


def _captions_end_to_end(tmp_path, serve_dir, captions: list[str]) -> None:
    from curate.pool.download import DownloadConfig, download
    from curate.filter.engine import FilterConfig, filter_pool
    from curate.pool.verify import verify_pool
    from curate.reshard.stage import ReshardConfig, reshard

    (tmp_path / "www").mkdir()
    for i in range(len(captions)):
        (tmp_path / "www" / f"i{i}.png").write_bytes(_png(i))
    base = serve_dir(tmp_path)
    bad_urls = ["javascript:alert(1)", "data:image/png;base64,iVBORw0KGgo=", "FILE:///etc/passwd",
                f"{base}/../../../etc/passwd"]
    urls = [f"{base}/i{i}.png" for i in range(len(captions))] + bad_urls
    texts = captions + [f"bad url {i}" for i in range(len(bad_urls))]
    pq.write_table(pa.table({"url": urls, "text": texts}), tmp_path / "urls.parquet")
    pool = tmp_path / "pool"
    s = download(DownloadConfig(urls=tmp_path / "urls.parquet", out=pool, distributor="multiprocessing", processes=1,
                                threads=4, timeout=5.0, shard_size=4, image_size=32, progress=False, echo=False,
                                allow_loopback=True))
    assert sum(s["counts"].values()) == len(urls)
    assert verify_pool(pool).ok
    meta = pq.read_table(pool / "metadata").to_pylist()
    by_text = {r["text"]: r for r in meta}
    assert set(by_text) == set(texts)  # every caption stored exactly, none mangled
    assert all(by_text[t]["status"] == "success" for t in captions)
    # the traversal URL reached the server but not outside its www/ folder: a 404 (or rejection), recorded
    assert by_text["bad url 3"]["status"] != "success"
    assert {by_text[f"bad url {i}"]["status"] for i in range(3)} == {"rejected_bad_url"}
    txt_in_tars = {}
    for t in sorted((pool / "shards").glob("*.tar")):
        with tarfile.open(t) as tf:
            for m in tf:
                assert re.fullmatch(r"[0-9]+\.(jpg|txt|json)", m.name), m.name
                if m.name.endswith(".txt"):
                    txt_in_tars[m.name[:-4]] = tf.extractfile(m).read().decode("utf-8")
    assert sorted(txt_in_tars.values()) == sorted(captions)

    (tmp_path / "r.yaml").write_text("name: hostile\nsteps:\n  - basic: {min_words: 1, min_chars: 1, min_side: 1, english: false}\n")
    f = filter_pool(FilterConfig(recipe=str(tmp_path / "r.yaml"), pool=str(pool), out=str(tmp_path / "subset"),
                                 progress=False, workers=1))
    led = pq.read_table(tmp_path / "subset" / "decisions.parquet").to_pandas()
    assert len(led[led.step == "pool"]) == len(urls)
    sub = pq.read_table(tmp_path / "subset" / "subset.parquet").to_pylist()
    assert f["kept"] == len(sub) == len(captions) and {r["text"] for r in sub} == set(captions)

    r = reshard(ReshardConfig(subset=tmp_path / "subset", pool=pool, shard_size=2, workers=1, progress=False))
    assert r["reconciles"] and r["n_written"] == len(sub)
    out_txt = {}
    for t in sorted((tmp_path / "subset" / "shards").glob("*.tar")):
        with tarfile.open(t) as tf:
            for m in tf:
                if m.name.endswith(".txt"):
                    out_txt[m.name[:-4]] = tf.extractfile(m).read().decode("utf-8")
    assert out_txt == {r["uid"]: r["text"] for r in sub}


# ---------------------------------------------------------------- hostile pool shards


def _rewrite_tar_with_extra(tar_path: Path, extra: dict[str, bytes], prefix_key: str | None = None) -> None:
    """Rewrite a pool tar keeping its members and adding `extra` (names as given, unchecked)."""
    with tarfile.open(tar_path) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf]
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tw:
        for name, data in list(extra.items()) + members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tw.addfile(ti, io.BytesIO(data))


def test_reshard_never_writes_outside_its_folder_from_hostile_member_names(tmp_path):
    from curate.core import uids as U
    from curate.reshard.stage import ReshardConfig, reshard
    from tests.run_factory import make_subset

    fp = make_pool(tmp_path / "area" / "pool", n_shards=2, per_shard=8, corrupt=0, failed=1)
    escape_dir = tmp_path / "area"
    abs_target = tmp_path / "abs_escape.jpg"
    _rewrite_tar_with_extra(fp.pool / "shards" / "00000000.tar", {
        "../../escaped.jpg": b"x", "../../../escaped.txt": b"y", str(abs_target): b"z",
        "a/../../../../escaped2.json": b"{}", "sub/dir/00000.jpg": b"w", "noext": b"v", "k.j\x00pg": b"n",
    })
    ok = fp.success_uids()
    subset = make_subset(tmp_path / "area" / "subset", ok + ok[:3])
    s = reshard(ReshardConfig(subset=subset, pool=fp.pool, shard_size=5, workers=1, progress=False))
    assert s["reconciles"] and s["n_written"] == len(ok) + 3
    assert not abs_target.exists()
    assert not list(escape_dir.rglob("escaped*")) and not list(tmp_path.glob("escaped*"))
    names = []
    for t in sorted((subset / "shards").glob("*.tar")):
        with tarfile.open(t) as tf:
            names += [m.name for m in tf]
    assert names and all(re.fullmatch(r"[0-9a-f]{32}(-\d+)?\.(jpg|txt|json)", n) for n in names), names
    assert {n.split(".")[0].split("-")[0] for n in names} == set(U.decode(U.load(subset / "uids.npy")))


def test_embed_records_a_bomb_image_in_a_shard_and_embeds_the_rest(tmp_path):
    """A pool shard whose image is a decompression bomb: a per-row error, not a crash or 1 GB of RAM."""
    import torch

    from curate.embed.stage import EmbedConfig, embed
    from curate.clip.models import load_model, save_checkpoint

    fp = make_pool(tmp_path / "pool", n_shards=1, per_shard=6, corrupt=0, failed=0)
    victim = fp.success_uids(0)[2]
    tar = fp.pool / "shards" / "00000000.tar"
    with tarfile.open(tar) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf]
    bomb = bomb_png(20000)
    key = next(r["key"] for r in fp.rows if r["uid"] == victim)
    with tarfile.open(tar, "w") as tw:
        for name, data in members:
            data = bomb if name == f"{key}.jpg" else data
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tw.addfile(ti, io.BytesIO(data))
    torch.manual_seed(0)
    ckpt = tmp_path / "debug.pt"
    save_checkpoint(load_model("curate-debug", None, "cpu").model, ckpt)
    s = embed(EmbedConfig(pool=fp.pool, model="curate-debug", pretrained=str(ckpt), batch_size=4, progress=False,
                          loader_workers=0))
    t = pq.read_table(Path(s["out_dir"]) / "00000000.parquet").to_pylist()
    assert [r["uid"] for r in t] == fp.success_uids(0)  # every row accounted for
    row = next(r for r in t if r["uid"] == victim)
    assert row["image_emb"] is None and "pixels" in row["error"]
    assert all(r["image_emb"] is not None for r in t if r["uid"] != victim)


def test_reshard_refuses_non_hex_uids_in_pool_metadata_naming_them(tmp_path):
    from curate.reshard.stage import ReshardConfig, reshard
    from tests.run_factory import make_subset

    fp = make_pool(tmp_path / "pool", n_shards=1, per_shard=5, corrupt=0, failed=0)
    meta_p = fp.pool / "metadata" / "00000000.parquet"
    t = pq.read_table(meta_p)
    uids = t["uid"].to_pylist()
    uids[3] = "../../../../etc/passwd"
    pq.write_table(t.set_column(0, "uid", pa.array(uids)), meta_p)
    subset = make_subset(tmp_path / "subset", [u for u in fp.success_uids() if u != fp.success_uids()[3]])
    with pytest.raises(CurateError, match=r"etc/passwd.*32 lowercase hex"):
        reshard(ReshardConfig(subset=subset, pool=fp.pool, shard_size=5, workers=1, progress=False))
    assert not list((subset / "shards").glob("*.tar")) if (subset / "shards").exists() else True


def test_filter_refuses_non_hex_uids_in_pool_metadata_before_writing_anything(tmp_path):
    """Found by this suite: uids were validated only when uids.npy was written, after subset.parquet, and the
    error named the subset row; curate/filter/engine.py now checks them with the pool step, naming the file."""
    from curate.filter.engine import FilterConfig, filter_pool
    from tests.metadata_factory import write_metadata

    rows = [{"uid": f"{i:032x}", "text": "a red cat sitting on a mat"} for i in range(6)]
    rows[4]["uid"] = "ABCDEF" * 5 + "00"  # upper case: not the contract's lowercase hex
    write_metadata(tmp_path / "pool", rows=rows)
    (tmp_path / "r.yaml").write_text("name: r\nsteps:\n  - basic: {min_words: 1, english: false}\n")
    with pytest.raises(CurateError, match=r"00000000\.parquet.*ABCDEF"):
        filter_pool(FilterConfig(recipe=str(tmp_path / "r.yaml"), pool=str(tmp_path / "pool"),
                                 out=str(tmp_path / "out"), progress=False, workers=1))
    assert not (tmp_path / "out" / "subset.parquet").exists()


# ---------------------------------------------------------------- recipes: YAML alias bombs

_LOL = "[" + ", ".join(["&a0 [x, x, x, x, x, x, x, x, x, x]"]
                       + [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]) + "]"


@pytest.mark.parametrize("where", ["name", "param", "key"])
def test_recipe_alias_bomb_is_a_quick_curate_error(tmp_path, where):
    """Found by this suite: the error message spelled out repr(value) of a 10**9-leaf alias bomb (minutes of CPU);
    fixed in curate/filter/recipe.py with a size-bounded repr."""
    text = {"name": f"name: {_LOL}\nsteps: []\n", "param": f"name: x\nsteps:\n  - basic: {{min_words: {_LOL}}}\n",
            "key": f"name: x\nsteps:\n  - basic: {{? {_LOL} : 1}}\n"}[where]
    (tmp_path / "bomb.yaml").write_text(text)
    code = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # a bomb that allocates dies here, not the box
        from curate.filter.recipe import load_recipe
        load_recipe({str(tmp_path / 'bomb.yaml')!r})
    """)
    try:
        p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=25)
    except subprocess.TimeoutExpired:
        pytest.fail("parsing a 500-byte recipe took more than 25 s")
    assert p.returncode == 1 and "CurateError" in p.stderr and "bomb.yaml:" in p.stderr, p.stderr[-2000:]
    assert len(p.stderr) < 5000  # the message does not spell out the 10**9 leaves
