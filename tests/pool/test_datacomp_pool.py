"""DataComp's released pools used directly: import in place, recipes on the precomputed scores and npz
embeddings, clear errors for malformed files, given uids and face blurring through `curate download`."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from curate.core import uids as U
from curate.cli import main
from curate.pool.datacomp import ImportConfig, batch_vectors, import_datacomp, inspect_npz, member_array
from curate.core.errors import CurateError
from curate.filter.engine import FilterConfig, filter_pool
from tests.datacomp_factory import NPZ_KEYS, PARQUET_SCHEMA, write_datacomp_pool

REPO = Path(__file__).resolve().parents[2]
DIMS = {"b32": 12, "l14": 16}
L14 = "ViT-L-14__openai"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("datacomp") / "metadata"
    write_datacomp_pool(d, n_rows=3000, n_files=3, seed=5, dims=DIMS)
    return d


@pytest.fixture(scope="module")
def pool(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dcpool") / "pool"
    s = import_datacomp(ImportConfig(metadata_dir=source, out=out))
    assert s["rows"] == 3000 and s["files"] == 3 and s["embeddings"]
    return out


def _all_rows(source: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(f) for f in sorted(source.glob("*.parquet")))


def test_fixture_has_datacomps_published_format(source):
    files = sorted(source.glob("*.parquet"))
    assert [f.stem for f in files] == ["0000000000", "0000000001", "0000000002"]
    for f in files:
        assert pq.read_schema(f).remove_metadata() == PARQUET_SCHEMA
        t = pq.read_table(f, columns=["uid", "clip_l14_similarity_score"])
        z = np.load(f.with_suffix(".npz"))
        assert sorted(z.files) == sorted(NPZ_KEYS)
        for k in NPZ_KEYS:
            assert z[k].dtype == np.float16 and z[k].shape == (t.num_rows, DIMS[k[:3]])
        # the score is the cosine of the row's own image and text embeddings (rows are aligned)
        cos = (z["l14_img"].astype(np.float32) * z["l14_txt"].astype(np.float32)).sum(1)
        np.testing.assert_allclose(cos, t["clip_l14_similarity_score"].to_numpy(), atol=1e-5)
        assert all(U.is_uid(u) for u in t["uid"].to_pylist())
        # np.savez stores members uncompressed, which is what lets us memory-map them
        assert all(m.offset is not None for m in inspect_npz(f.with_suffix(".npz")).values())


def test_import_reads_in_place_and_is_idempotent(source, pool, tmp_path):
    links = sorted((pool / "metadata").glob("*.parquet"))
    assert len(links) == 3 and all(p.is_symlink() for p in links)
    assert [p.resolve() for p in links] == [f.resolve() for f in sorted(source.glob("*.parquet"))]
    desc = json.loads((pool / "datacomp.json").read_text())
    assert desc["rows"] == 3000 and sorted(desc["models"]) == ["ViT-B-32__openai", L14]
    assert (pool / "embeddings" / L14 / "_datacomp_index.parquet").exists()
    r = CliRunner().invoke(main, ["pool", "import-datacomp", str(source), "--out", str(pool)])
    assert r.exit_code == 0 and "already up to date" in r.output
    # the files are not copied: the pool is a few KB whatever the source size
    assert sum(f.stat().st_size for f in pool.rglob("*") if f.is_file() and not f.is_symlink()) < 100_000


def test_npz_rows_are_memory_mapped_and_gathered_exactly(source):
    npz = sorted(source.glob("*.npz"))[1]
    mm = member_array(npz, "l14_img")
    assert isinstance(mm, np.memmap)
    full = np.load(npz)["l14_img"]
    rows = np.array([7, 3, 999, 3, 0])
    t = pa.table({"_npz_src": [str(npz)] * 5, "_npz_row": rows, "_npz_prefix": ["l14"] * 5})
    np.testing.assert_array_equal(batch_vectors(t, "img"), full[rows].astype(np.float32))
    # a compressed npz (np.savez_compressed) gives the same vectors, decompressed instead of mapped
    comp = npz.parent.parent / "compressed.npz"
    with np.load(npz) as z:
        np.savez_compressed(comp, **{k: z[k] for k in z.files})
    assert inspect_npz(comp)["l14_img"].offset is None
    t2 = t.set_column(0, "_npz_src", pa.array([str(comp)] * 5))
    np.testing.assert_array_equal(batch_vectors(t2, "img"), full[rows].astype(np.float32))


def _copy_source(source: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for f in source.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_malformed_npz_errors_name_the_file(source, tmp_path):
    bad = _copy_source(source, tmp_path / "bad_key")
    npz = bad / "0000000001.npz"
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["l14_image"] = arrays.pop("l14_img")
    np.savez(npz, **arrays)
    with pytest.raises(CurateError, match=r"0000000001\.npz: no array 'l14_img'"):
        import_datacomp(ImportConfig(metadata_dir=bad, out=tmp_path / "p1"))

    short = _copy_source(source, tmp_path / "short")
    npz = short / "0000000002.npz"
    with np.load(npz) as z:
        arrays = {k: z[k][:-1] for k in z.files}
    np.savez(npz, **arrays)
    with pytest.raises(CurateError, match=r"0000000002\.npz: 'b32_img' has shape \(999, 12\), expected \(1000, d\)"):
        import_datacomp(ImportConfig(metadata_dir=short, out=tmp_path / "p2"))

    junk = _copy_source(source, tmp_path / "junk")
    (junk / "0000000000.npz").write_bytes(b"not a zip at all")
    r = CliRunner().invoke(main, ["pool", "import-datacomp", str(junk), "--out", str(tmp_path / "p3")])
    assert r.exit_code != 0 and "0000000000.npz: not a readable .npz archive" in r.output
    assert "Traceback" not in r.output


def test_malformed_parquet_errors_name_the_file_and_row(source, tmp_path):
    d = _copy_source(source, tmp_path / "nocol")
    t = pq.read_table(d / "0000000001.parquet").drop_columns(["clip_l14_similarity_score"])
    pq.write_table(t, d / "0000000001.parquet")
    with pytest.raises(CurateError, match=r"0000000001\.parquet: missing DataComp column\(s\) \['clip_l14_similarity_score'\]"):
        import_datacomp(ImportConfig(metadata_dir=d, out=tmp_path / "p1"))

    d = _copy_source(source, tmp_path / "baduid")
    t = pq.read_table(d / "0000000002.parquet")
    u = t["uid"].to_pylist()
    u[17] = "XYZ"
    pq.write_table(t.set_column(0, "uid", pa.array(u)), d / "0000000002.parquet")
    with pytest.raises(CurateError, match=r"0000000002\.parquet: row 17 has uid 'XYZ'"):
        import_datacomp(ImportConfig(metadata_dir=d, out=tmp_path / "p2"))


def _recipe(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    return str(p)


def test_clip_l14_30pct_matches_datacomps_rule(source, pool, tmp_path):
    rows = _all_rows(source)
    uid = np.array(rows["uid"].to_pylist())
    score = rows["clip_l14_similarity_score"].to_numpy()
    n = len(score)

    s = filter_pool(FilterConfig(recipe=str(REPO / "recipes" / "clip_l14_30pct.yaml"), pool=str(pool),
                                 out=str(tmp_path / "ours"), report=False, progress=False))
    assert s["pool_rows"] == n and s["candidates"] == n
    # curate's documented rule: exactly floor(0.3 N) rows, by L/14 score descending then uid ascending
    order = np.lexsort((uid, -score.astype(np.float64)))
    expect = U.encode(uid[order[: int(np.floor(0.3 * n))]].tolist())
    got = np.load(tmp_path / "ours" / "uids.npy")
    assert len(got) == int(0.3 * n) and np.array_equal(got, expect)

    # DataComp's own rule (baselines' get_threshold): t = sorted_desc[int(N * 0.3)], keep score >= t
    text = (REPO / "recipes" / "clip_l14_30pct.yaml").read_text().replace(
        "keep_top_fraction: 0.3}", "keep_top_fraction: 0.3, datacomp_ties: true}")
    filter_pool(FilterConfig(recipe=_recipe(tmp_path, "dc", text), pool=str(pool), out=str(tmp_path / "dc"),
                             report=False, progress=False))
    t = -np.sort(-score)[int(n * 0.3)]
    ref = np.array([(int(u[:16], 16), int(u[16:], 16)) for u in uid[score >= t]], np.dtype("u8,u8"))
    ref.sort()
    assert (tmp_path / "dc" / "uids.npy").read_bytes() == _npy_bytes(ref)
    # and it is the L/14 column that was used, not B/32's
    b32 = rows["clip_b32_similarity_score"].to_numpy()
    assert not np.array_equal(np.sort(uid[score >= t]), np.sort(uid[b32 >= -np.sort(-b32)[int(n * 0.3)]]))
    # the subset carries the face boxes, so downloading it blurs them (curate download's default)
    sub = pq.read_table(tmp_path / "dc" / "subset.parquet").to_pandas().set_index("uid")
    src = rows.to_pandas().set_index("uid").loc[sub.index]
    assert [list(map(list, b)) for b in sub.face_bboxes] == [list(map(list, b)) for b in src.face_bboxes]
    # the ledger accounts for every released row
    dec = pq.read_table(tmp_path / "dc" / "decisions.parquet")
    assert dec.filter(pa.compute.equal(dec["step"], "pool")).num_rows == n


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_image_based_runs_from_the_npz_embeddings(source, pool, tmp_path):
    rows = _all_rows(source)
    with np.load(source / "0000000001.npz") as z:
        targets = z["l14_img"][[10, 20]].astype(np.float32)
    np.save(tmp_path / "targets.npy", targets)
    text = ("name: dc_image_based\nsteps:\n"
            "  - image_based: {model: ViT-L-14, target: targets.npy, n_clusters: 30, caption_filter: false}\n")
    s = filter_pool(FilterConfig(recipe=_recipe(tmp_path, "ib", text), pool=str(pool), out=str(tmp_path / "ib"),
                                 report=False, progress=False))
    kept = set(pq.read_table(tmp_path / "ib" / "subset.parquet", columns=["uid"])["uid"].to_pylist())
    assert 0 < s["kept"] < rows.num_rows
    # the target vectors are pool rows 1010 and 1020: their own rows must land in target clusters
    uids = rows["uid"].to_pylist()
    assert uids[1010] in kept and uids[1020] in kept
    dec = pq.read_table(tmp_path / "ib" / "decisions.parquet").to_pandas()
    step = dec[dec.step != "pool"]
    assert len(step) == rows.num_rows and step.reason.isna().sum() == s["kept"]
    assert not step.reason.eq("no image embedding").any()  # every row found its npz vector


# ---------------------------------------------------------------- download: given uids, face blurring

def _noise_png(size: int = 128, seed: int = 0) -> bytes:
    a = (np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _samples(pool: Path) -> dict[str, tuple[dict, np.ndarray]]:
    """uid -> (sample json, decoded image) over every tar of the pool."""
    out = {}
    for tar in sorted((pool / "shards").glob("*.tar")):
        with tarfile.open(tar) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                img = np.asarray(Image.open(io.BytesIO(members[name[:-5] + ".jpg"])).convert("RGB")).astype(int)
                out[meta["uid"]] = (meta, img)
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from curate.pool.serve import running_server

    root = tmp_path_factory.mktemp("dcwww")
    (root / "www").mkdir()
    (root / "www" / "noise.png").write_bytes(_noise_png())
    with running_server(root, port=0) as base:
        yield root, base


def _datacomp_input(path: Path, base: str) -> list[str]:
    """A DataComp-format parquet of 3 rows pointing at the same image: a face box, no box, null."""
    uids = ["00112233445566778899aabbccddeeff", "ffeeddccbbaa99887766554433221100", "0123456789abcdef0123456789abcdef"]
    t = pa.table({
        "uid": uids, "url": [f"{base}/noise.png?{i}" for i in range(3)], "text": ["a face", "no face", "unknown"],
        "original_width": [128] * 3, "original_height": [128] * 3,
        "clip_b32_similarity_score": pa.array([0.3] * 3, pa.float32()),
        "clip_l14_similarity_score": pa.array([0.3] * 3, pa.float32()),
        "face_bboxes": pa.array([[[0.25, 0.25, 0.5, 0.5]], [], None], pa.list_(pa.list_(pa.float64()))),
        "sha256": ["0" * 64] * 3,
    }, schema=PARQUET_SCHEMA)
    pq.write_table(t, path)
    return uids


def _download(urls: Path, out: Path, **kw):
    from curate.pool.download import DownloadConfig, download

    return download(DownloadConfig(urls=urls, out=out, distributor="multiprocessing", processes=1, threads=4,
                                   timeout=5.0, shard_size=8, image_size=128, resize_mode="no", progress=False,
                                   echo=False, allow_loopback=True, **kw))


def test_given_uids_survive_and_faces_are_blurred_by_default(served, tmp_path):
    root, base = served
    urls = tmp_path / "0000.parquet"
    uids = _datacomp_input(urls, base)
    _download(urls, tmp_path / "pool")
    meta = pq.read_table(tmp_path / "pool" / "metadata" / "00000000.parquet").to_pandas()
    assert sorted(meta.uid) == sorted(uids) and set(meta.status) == {"success"}
    samples = _samples(tmp_path / "pool")
    assert set(samples) == set(uids)  # the shard json carries the given uid, unchanged
    face, plain, null = (samples[u][1] for u in uids)
    assert np.array_equal(plain, null)  # no box and a null box: untouched
    # The box is [32, 64) px; img2dataset grows it by 10% of its diagonal and feathers the mask
    # (Gaussian, sigma = 10% of the diagonal): pixels change in [25, 70). JPEG codes 16x16 blocks
    # ([16, 80) here) and the decoder's chroma upsampling reaches one pixel further, so outside
    # [12, 84) every pixel is the unblurred one, bit for bit; inside the box the noise is smoothed away.
    outside = np.ones((128, 128), bool)
    outside[12:84, 12:84] = False
    assert outside.sum() > 0.65 * outside.size
    assert np.array_equal(face[outside], plain[outside])
    inside = (slice(36, 60), slice(36, 60))
    assert np.abs(face[inside] - plain[inside]).mean() > 30
    assert face[inside].std() < plain[inside].std() / 3


def test_no_blur_faces_keeps_images_untouched(served, tmp_path):
    root, base = served
    urls = tmp_path / "0000.parquet"
    uids = _datacomp_input(urls, base)
    _download(urls, tmp_path / "pool", blur_faces=False)
    samples = _samples(tmp_path / "pool")
    assert np.array_equal(samples[uids[0]][1], samples[uids[1]][1])
    # a blur request without a box column is an error naming the column, not a silent no-op
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"url": [f"{base}/noise.png"], "text": ["x"]}), plain)
    with pytest.raises(CurateError, match="face_bboxes"):
        _download(plain, tmp_path / "pool2", blur_faces=True)


def test_select_datacomp_streams_the_same_uids_as_filter(source, pool, tmp_path):
    from curate.filter.datacomp_select import encode_uid_array

    rows = _all_rows(source)
    assert np.array_equal(encode_uid_array(rows["uid"]), np.array(
        [(int(u[:16], 16), int(u[16:], 16)) for u in rows["uid"].to_pylist()], np.dtype("u8,u8")))
    base = (REPO / "recipes" / "clip_l14_30pct.yaml").read_text()
    variants = {"top": base, "ties": base.replace("0.3}", "0.3, datacomp_ties: true}"),
                "thr": base.replace("keep_top_fraction: 0.3}", "threshold: 0.3}"),
                "b32": base.replace("ViT-L-14", "ViT-B-32")}
    for name, text in variants.items():
        r = _recipe(tmp_path, name, text)
        filter_pool(FilterConfig(recipe=r, pool=str(pool), out=str(tmp_path / f"f_{name}"), report=False,
                                 progress=False))
        res = CliRunner().invoke(main, ["pool", "select-datacomp", "--recipe", r, "--pool", str(pool),
                                        "--out", str(tmp_path / f"{name}.npy")])
        assert res.exit_code == 0, res.output
        assert (tmp_path / f"{name}.npy").read_bytes() == (tmp_path / f"f_{name}" / "uids.npy").read_bytes(), name
    res = CliRunner().invoke(main, ["pool", "select-datacomp", "--recipe", r, "--pool", str(pool),
                                    "--out", str(tmp_path / "b32.npy")])
    assert "already up to date" in res.output
    other = _recipe(tmp_path, "basic", "name: b\nsteps:\n  - basic: {}\n")
    res = CliRunner().invoke(main, ["pool", "select-datacomp", "--recipe", other, "--pool", str(pool),
                                    "--out", str(tmp_path / "x.npy")])
    assert res.exit_code != 0 and "use `curate filter`" in res.output and "Traceback" not in res.output


def test_face_boxes_are_read_and_checked_by_the_input_reader(tmp_path):
    from curate.pool.download_input import read_input

    ok = tmp_path / "ok.parquet"
    pq.write_table(pa.table({"url": ["http://h/1", "http://h/2"], "text": ["a", "b"],
                             "face_bboxes": pa.array([[[0.1, 0.1, 0.2, 0.2]], None], pa.list_(pa.list_(pa.float32())))}),
                   ok)
    inp = read_input(ok)
    assert inp.has_bboxes and inp.table["face_bboxes"].to_pylist()[1] is None
    assert np.allclose(inp.table["face_bboxes"].to_pylist()[0], [[0.1, 0.1, 0.2, 0.2]])
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"url": ["http://h/1", "http://h/2"], "text": ["a", "b"],
                             "face_bboxes": [[[0.1, 0.1, 0.2, 0.2]], [[0.1, 0.2, 0.3]]]}), bad)
    with pytest.raises(CurateError, match=r"bad\.parquet: row 1 of column 'face_bboxes' has a box that is not"):
        read_input(bad)
