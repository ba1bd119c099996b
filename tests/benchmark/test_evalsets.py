"""Evaluation-set layout: build-offline from real local data, the pool's held-out splits, loader errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from benchmark import evalsets as E
from benchmark.tasks import TASKS
from curate.core.errors import CurateError

FMNIST = E.FASHION_MNIST_DIR


def _png(color, size=(24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def make_pool_evalsets(pool: Path, n_per_class: int = 4, corrupt: bool = False) -> Path:
    """A POOLBUILD/evalsets/ tree as the offline pool builder writes it (small, generated images)."""
    colors = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]
    names = {"emoji_category": ["red things", "green things", "blue things"],
             "flags_country": ["Redland", "Greenland", "Blueland"]}
    for task, classnames in names.items():
        d = pool / "evalsets" / task
        (d / "images").mkdir(parents=True)
        rows = []
        for c, color in enumerate(colors):
            for j in range(n_per_class):
                rel = f"images/{c}_{j}.png"
                (d / rel).write_bytes(_png(tuple(min(255, v + 8 * j) for v in color)))
                rows.append({"image": rel, "label": c, "classname": classnames[c], "caption": f"{classnames[c]} {j}"})
        if corrupt:
            (d / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
            rows.append({"image": "images/bad.png", "label": 0, "classname": classnames[0], "caption": "bad"})
        pq.write_table(pa.Table.from_pylist(rows), d / "index.parquet")
        (d / "classnames.txt").write_text("\n".join(classnames) + "\n")
    d = pool / "evalsets" / "tuxpaint_retrieval"
    (d / "images").mkdir(parents=True)
    rows = []
    for i in range(12):
        rel = f"images/{i}.png"
        (d / rel).write_bytes(_png((20 * i, 255 - 20 * i, 100)))
        rows.append({"image": rel, "label": i, "classname": f"thing {i}", "caption": f"a picture of thing number {i}"})
    pq.write_table(pa.Table.from_pylist(rows), d / "index.parquet")
    return pool


def _samples(folder: Path) -> list[dict]:
    import webdataset as wds

    n = int((folder / "test" / "nshards.txt").read_text())
    return list(wds.WebDataset([str(folder / "test" / f"{i}.tar") for i in range(n)], shardshuffle=False))


@pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian dataset-fashion-mnist not installed (make setup installs it)")
def test_build_offline_real_sets_load_with_webdataset_and_labels_match_source(tmp_path):
    out = tmp_path / "ev"
    summary = E.build_offline(E.BuildOfflineConfig(out=out, limit=50))
    assert summary["offline/fashion_mnist"] == {"status": "built", "n": 50}
    assert summary["offline/digits"] == {"status": "built", "n": 50}
    assert summary["offline/emoji_category"]["status"] == "missing"  # no --pool-dir: reported, not faked

    fm = out / TASKS["offline/fashion_mnist"].folder
    samples = _samples(fm)
    labels = E.read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")[:50]
    images = E.read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")[:50]
    assert [int(s["cls"]) for s in samples] == labels.tolist()
    # the stored PNG is the exact source image
    assert np.array_equal(np.array(Image.open(io.BytesIO(samples[7]["png"]))), images[7])
    assert (fm / "classnames.txt").read_text().splitlines() == E.FASHION_MNIST_CLASSES
    assert all("{c}" in t for t in (fm / "zeroshot_classification_templates.txt").read_text().splitlines())

    from sklearn.datasets import load_digits

    dg = _samples(out / TASKS["offline/digits"].folder)
    assert [int(s["cls"]) for s in dg] == load_digits().target[:50].tolist()

    # the loader (the evaluator's code path) accepts what was built
    es = E.open_evalset(TASKS["offline/fashion_mnist"], out)
    assert es.classnames == E.FASHION_MNIST_CLASSES and len(es.shards) == 1


def test_build_offline_is_idempotent_and_rebuilds_on_change(tmp_path):
    out = tmp_path / "ev"
    cfg = E.BuildOfflineConfig(out=out, limit=20)
    E._build_digits(cfg, TASKS["offline/digits"])
    tar = out / TASKS["offline/digits"].folder / "test" / "0.tar"
    mtime = tar.stat().st_mtime_ns
    assert E._build_digits(cfg, TASKS["offline/digits"])["status"] == "up_to_date"
    assert tar.stat().st_mtime_ns == mtime
    cfg.limit = 30  # a changed input rebuilds
    assert E._build_digits(cfg, TASKS["offline/digits"]) == {"status": "built", "n": 30}
    assert len(_samples(out / TASKS["offline/digits"].folder)) == 30
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_build_offline_cli_with_pool_dir(tmp_path):
    from curate.cli import main

    pool = make_pool_evalsets(tmp_path / "pool", corrupt=True)
    out = tmp_path / "ev"
    r = CliRunner().invoke(main, ["evalsets", "build-offline", "--out", str(out), "--pool-dir", str(pool),
                                  "--limit", "100"])
    assert r.exit_code == 0, r.output
    assert "offline/emoji_category" in r.output and "1 skipped" in r.output
    emoji = out / TASKS["offline/emoji_category"].folder
    samples = _samples(emoji)
    assert len(samples) == 12  # 13 rows, the corrupt image recorded in build.json, not written
    build = json.loads((emoji / "build.json").read_text())
    assert build["n"] == 12 and build["skipped"][0]["image"] == "images/bad.png"
    assert (emoji / "classnames.txt").read_text().splitlines() == ["red things", "green things", "blue things"]
    tux = out / TASKS["offline/tuxpaint_retrieval"].folder
    assert (tux / "dataset_type.txt").read_text().strip() == "retrieval"
    assert sorted(s["txt"].decode() for s in _samples(tux))[0] == "a picture of thing number 0"
    es = E.open_evalset(TASKS["offline/tuxpaint_retrieval"], out)
    assert es.dataset_type == "retrieval"
    r2 = CliRunner().invoke(main, ["evalsets", "build-offline", "--out", str(out), "--pool-dir", str(pool),
                                   "--limit", "100"])
    assert r2.output.count("already up to date") == 5, r2.output


def test_pool_split_path_traversal_and_bad_label_are_errors_naming_the_row(tmp_path):
    pool = make_pool_evalsets(tmp_path / "pool")
    idx = pool / "evalsets" / "emoji_category" / "index.parquet"
    rows = pq.read_table(idx).to_pylist()
    rows[2]["image"] = "../../../etc/passwd"
    pq.write_table(pa.Table.from_pylist(rows), idx)
    cfg = E.BuildOfflineConfig(out=tmp_path / "ev", pool_dir=pool)
    with pytest.raises(CurateError, match=r"row 2: image path '\.\./\.\./\.\./etc/passwd' escapes"):
        E._build_pool_task(cfg, TASKS["offline/emoji_category"])
    rows[2]["image"] = "images/0_2.png"
    rows[5]["label"] = 9
    pq.write_table(pa.Table.from_pylist(rows), idx)
    with pytest.raises(CurateError, match=r"row 5: label 9 outside 0..2"):
        E._build_pool_task(cfg, TASKS["offline/emoji_category"])
    assert not (tmp_path / "ev" / TASKS["offline/emoji_category"].folder).exists()  # nothing half-written


def test_open_evalset_missing_and_broken_layouts(tmp_path):
    task = TASKS["vtab/cifar100"]
    with pytest.raises(E.MissingEvalSet):
        E.open_evalset(task, tmp_path)
    folder = tmp_path / task.folder
    E.write_evalset(folder, [{"__key__": "a", "png": _png((1, 2, 3)), "cls": "0"}], ["x", "y"], ["a photo of {c}."])
    assert E.open_evalset(task, tmp_path).classnames == ["x", "y"]
    (folder / "test" / "nshards.txt").write_text("2\n")
    with pytest.raises(CurateError, match="says 2 shards but 1.tar missing"):
        E.open_evalset(task, tmp_path)
    (folder / "test" / "nshards.txt").write_text("1\n")
    (folder / "zeroshot_classification_templates.txt").write_text("a photo of a thing.\n")
    with pytest.raises(CurateError, match="has no {c} placeholder"):
        E.open_evalset(task, tmp_path)
    (folder / "classnames.txt").unlink()
    with pytest.raises(CurateError, match="classnames.txt is missing"):
        E.open_evalset(task, tmp_path)


def test_imagenet_folder_without_class_files_uses_open_clip_metadata(tmp_path):
    task = TASKS["imagenet1k"]
    E.write_evalset(tmp_path / task.folder, [{"__key__": "a", "png": _png((1, 2, 3)), "cls": "0"}], None, None)
    es = E.open_evalset(task, tmp_path)
    assert len(es.classnames) == 1000 and len(es.templates) == 80 and "{c}" in es.templates[0]


def test_read_idx_rejects_truncated_file(tmp_path):
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 100)
    with pytest.raises(CurateError, match="truncated"):
        E.read_idx(p)


def test_decode_image_caps_pixels():
    # evaluation images go through the pool's decoder: a pixel cap before decoding, errors are ValueErrors
    with pytest.raises(ValueError, match="20x20 pixels, over the cap of 100"):
        E.decode_image(_png((0, 0, 0), size=(20, 20)), max_pixels=100)
    with pytest.raises(ValueError, match="undecodable image"):
        E.decode_image(b"not an image")


def test_download_refuses_non_https():
    with pytest.raises(CurateError, match="non-https"):
        E._https("http://example.invalid/x.tar")
