"""Evaluation sets on disk: read DataComp's webdataset layout, build the offline suite, download.

One layout for everything (clip_benchmark's, which DataComp's evaluation sets use; see
benchmark/tasks.py for the tree), so the DataComp sets a user downloads and the offline sets built
here from real local data are scored by the same code path.

- `open_evalset(task, root)` finds and validates a task folder; `iter_batches(...)` streams its
  samples through a model's transform with webdataset + a torch DataLoader. A corrupt or oversized
  image is recorded (its key and reason) and skipped, never fatal and never silently lost.
- `build_offline(cfg)` writes Fashion-MNIST (Debian), scikit-learn's digits, and the held-out splits
  of the offline pool build (POOLBUILD/evalsets/<task>/) in that layout. Idempotent: a folder whose
  sources are unchanged is "already up to date". Suite v2 (benchmark/tasks.py SUITE_V2_GROUPS) adds
  the large pool's splits and Animal-MNIST, with chance levels computed from each built set.
- `download(cfg)` fetches DataComp's sets for users with internet (not exercised in tests).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import click
import numpy as np

from curate.core.hashing import sha256_file
from curate.pool.io import decode_image  # the pool's pixel-capped decoder; ImageDecodeError is a ValueError
from benchmark.tasks import (
    CLASSIFICATION, FAIRNESS, OFFLINE_KEYS, OFFLINE_V2, OFFLINE_V2_KEYS, RETRIEVAL, SUITE_V2_GROUPS,
    SUITE_V2_HEADLINE, SUITE_V2_REASONS, TASKS, WILDS, WINOGAVIL, Task, get_task,
)
from curate.core.atomic import write_json, write_text
from curate.core.errors import CurateError, MissingDependencyError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")
BUILD_VERSION = 1  # bump when the offline builder's output changes, to rebuild old folders
SHARD_SIZE = 5000
SMALL_SET_BYTES = 4 << 20  # below this, decode in-process (see iter_batches)

# PyPI animal-mnist 0.4 (MIT): only its wheel is downloaded (`make setup`: pip download --no-deps;
# installing it would pull tensorflow). Its two gzip'd numpy pickles are read from the zip with an
# unpickler that allows nothing but numpy's array reconstruction.
ANIMAL_MNIST_WHEEL = "animal_mnist-0.4-py3-none-any.whl"
ANIMAL_MNIST_SHA256 = "aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce"
ANIMAL_MNIST_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
ANIMAL_MNIST_INSTALL = ("make setup   (runs: .venv/bin/python -m pip download --no-deps --only-binary=:all: "
                        "--dest .deps/pypi animal-mnist==0.4)")

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot"]

# Prompt templates for the offline tasks ("{c}" = class name), written for this project.
TEMPLATES: dict[str, list[str]] = {
    "offline/fashion_mnist": [
        "a photo of a {c}.", "a black and white photo of a {c}.", "a low resolution photo of a {c}.",
        "a photo of the {c}, a type of clothing.", "a grayscale picture of a {c}.", "a small image of a {c}.",
    ],
    "offline/digits": [
        'a photo of the number: "{c}".', "a picture of the digit {c}.", "a handwritten {c}.",
        "a low resolution image of the number {c}.", "the digit {c} written by hand.",
    ],
    "offline/emoji_category": [
        "an emoji of {c}.", "{c} emoji.", "an icon from the category {c}.", "a picture of {c}.",
        "a cartoon image of {c}.",
    ],
    "offline/flags_country": [
        "the flag of {c}.", "a flag of {c}.", "the national flag of {c}.", "an emoji flag of {c}.",
        "a picture of the flag of {c}.",
    ],
    # suite v2 (classification tasks; retrieval tasks use their captions)
    "offline_v2/animal_silhouettes": [
        "a silhouette of a {c}.", "a black and white picture of a {c}.", "the shape of a {c}.",
        "a small drawing of a {c}.", "a {c}.",
    ],
    "offline_v2/emoji_heldout": [
        "an emoji of {c}.", "{c} emoji.", "a picture of {c}.", "an icon of {c}.", "a cartoon image of {c}.",
    ],
    "offline_v2/icon_heldout": [
        "an icon of {c}.", "a {c} icon.", "a pictogram of {c}.", "a simple drawing of {c}.", "{c}.",
    ],
    "offline_v2/flag_styles": [
        "the flag of {c}.", "a flag of {c}.", "the national flag of {c}.", "a picture of the flag of {c}.",
        "a round flag of {c}.",
    ],
}


def default_evalsets_dir() -> Path:
    """$CURATE_EVALSETS, else <repo root>/work/evalsets (the Makefile's work folder)."""
    env = os.environ.get("CURATE_EVALSETS")
    return Path(env) if env else REPO_ROOT / "work" / "evalsets"


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class MissingEvalSet(Exception):
    """The task's folder (or its test shards) is not on disk: the task is *missing*, not failed."""


@dataclass
class EvalSet:
    task: Task
    root: Path
    dataset_type: str  # classification | retrieval | multilabel
    shards: list[Path]
    classnames: list[str] | None
    templates: list[str] | None


def _read_lines(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def open_evalset(task: Task, root: str | os.PathLike, allow_missing_shards: bool = False) -> EvalSet:
    """Locate `task` under `root` and validate its layout.

    Raises MissingEvalSet when the folder or its shards are absent, CurateError naming the file
    when they are present but broken (bad nshards.txt, no class names for a classifier, ...).
    `allow_missing_shards`: keep the shards of nshards.txt that exist instead of refusing (curate evaluate
    then counts the items against the expected size and refuses, or marks the set partial).
    """
    folder = Path(root) / task.folder
    test = folder / "test"
    if not test.is_dir():
        raise MissingEvalSet(f"{task.key}: {folder} not found")
    nshards_file = test / "nshards.txt"
    if nshards_file.is_file():
        try:
            n = int(nshards_file.read_text().strip())
        except ValueError:
            raise CurateError(f"{nshards_file}: expected an integer shard count") from None
        shards = [test / f"{i}.tar" for i in range(n)]
        absent = [s.name for s in shards if not s.is_file()]
        if absent and not allow_missing_shards:
            raise CurateError(f"{task.key}: {nshards_file} says {n} shards but {', '.join(absent[:5])} missing")
        shards = [s for s in shards if s.is_file()]
    else:
        shards = sorted(test.glob("*.tar"), key=lambda p: (len(p.name), p.name))
    if not shards:
        raise MissingEvalSet(f"{task.key}: no .tar shards in {test}")
    dtype_lines = _read_lines(folder / "dataset_type.txt")
    dataset_type = dtype_lines[0].lower() if dtype_lines else CLASSIFICATION
    classnames = _read_lines(folder / "classnames.txt")
    templates = _read_lines(folder / "zeroshot_classification_templates.txt")
    if task.key in ("imagenet1k", "imagenetv2", "imagenet_sketch"):
        # DataComp ships these files too; open_clip carries the same lists, so a folder with only
        # the tars still works.
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

        classnames = classnames or list(IMAGENET_CLASSNAMES)
        templates = templates or [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]
    if task.type in (CLASSIFICATION, WILDS) or (task.type == FAIRNESS and task.scored):
        if not classnames:
            raise CurateError(f"{task.key}: {folder / 'classnames.txt'} is missing or empty")
        if not templates:
            raise CurateError(f"{task.key}: {folder / 'zeroshot_classification_templates.txt'} is missing or empty")
        bad = [t for t in templates if "{c}" not in t]
        if bad:
            raise CurateError(f"{task.key}: template {bad[0]!r} has no {{c}} placeholder")
    if task.type == RETRIEVAL and dataset_type != RETRIEVAL:
        raise CurateError(f"{task.key}: {folder / 'dataset_type.txt'} must say 'retrieval'")
    return EvalSet(task, folder, dataset_type, shards, classnames, templates)


def _image_bytes(sample: dict) -> bytes | None:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    return None


class _Prepare:
    """Turn one raw webdataset sample into (image tensor, ok, key, label, captions, meta, error).

    A picklable class (not a closure) so DataLoader workers can run it.
    """

    def __init__(self, transform, image_size: tuple[int, int, int]):
        self.transform = transform
        self.image_size = image_size

    def __call__(self, sample: dict):
        import torch

        key = sample.get("__key__", "?")
        label = int(sample["cls"].decode().strip()) if "cls" in sample else -1
        captions = [c for c in sample["txt"].decode("utf-8").splitlines() if c.strip()] if "txt" in sample else []
        meta = np.load(io.BytesIO(sample["npy"]), allow_pickle=False) if "npy" in sample else None
        data = _image_bytes(sample)
        err = None
        try:
            if data is None:
                raise ValueError("no image (webp/png/jpg/jpeg) in sample")
            tensor = self.transform(decode_image(data))
        except ValueError as e:
            err = str(e)
            tensor = torch.zeros(self.image_size)
        return tensor, err is None, key, label, captions, meta, err


def _collate(batch):
    import torch

    from curate.core.loader_workers import in_worker, share_tensors

    tensors, ok, keys, labels, captions, metas, errors = zip(*batch)
    out = {
        "images": torch.stack(tensors),
        "ok": torch.tensor(ok, dtype=torch.bool),
        "keys": list(keys),
        "labels": torch.tensor(labels, dtype=torch.long),
        "captions": list(captions),
        "meta": list(metas),
        "errors": list(errors),
    }
    return share_tensors(out) if in_worker() else out  # see curate/core/loader_workers.py


def transform_output_size(transform) -> tuple[int, int, int]:
    """Shape of the tensor `transform` makes (so failed samples get a same-shaped placeholder)."""
    from PIL import Image

    return tuple(transform(Image.new("RGB", (8, 8))).shape)


def iter_batches(evalset: EvalSet, transform, batch_size: int = 64, num_workers: int = 1) -> Iterator[dict]:
    """Yield batches (dict of images/ok/keys/labels/captions/meta/errors) in shard order."""
    import torch
    import webdataset as wds

    ds = wds.WebDataset(
        [str(s) for s in evalset.shards], shardshuffle=False, nodesplitter=lambda src: src,
    ).map(_Prepare(transform, transform_output_size(transform)))
    # One worker per shard at most (webdataset splits shards across workers); a small set is read in
    # this process, since starting a worker costs more than decoding a few hundred small images.
    nw = max(0, min(num_workers, len(evalset.shards)))
    if sum(s.stat().st_size for s in evalset.shards) < SMALL_SET_BYTES:
        nw = 0
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=nw, collate_fn=_collate)
    yield from loader


def iter_winogavil(evalset: EvalSet) -> Iterator[dict]:
    """Yield raw WinoGAViL instances: {key, cue, candidates, associations, images: [bytes, ...]}."""
    import webdataset as wds

    for sample in wds.WebDataset([str(s) for s in evalset.shards], shardshuffle=False,
                                 nodesplitter=lambda src: src):
        if "json" not in sample:
            raise CurateError(f"{evalset.task.key}: sample {sample.get('__key__')} has no .json")
        info = json.loads(sample["json"])
        images = []
        for i in range(len(info["candidates"])):
            data = next((sample[f"{i}.{e}"] for e in IMAGE_EXTS if f"{i}.{e}" in sample), None)
            images.append(data)
        yield {"key": sample["__key__"], "cue": info["cue"], "candidates": info["candidates"],
               "associations": info["associations"], "images": images}


# --------------------------------------------------------------------------------------------
# Writing (shared by build-offline and tests)
# --------------------------------------------------------------------------------------------


def write_evalset(folder: Path, samples, classnames: list[str] | None, templates: list[str] | None,
                  dataset_type: str = CLASSIFICATION, build_info: dict | None = None,
                  shard_size: int = SHARD_SIZE) -> int:
    """Write samples ({"__key__", "png"/"jpg", "cls" | "txt", ...}) as a task folder; return count.

    Built in a temp sibling then renamed into place, so a killed build leaves no partial folder.
    """
    import webdataset as wds

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}.", dir=folder.parent))
    try:
        (tmp / "test").mkdir()
        n = shard = 0
        writer = None
        for sample in samples:
            if writer is None or n % shard_size == 0 and n:
                if writer is not None:
                    writer.close()
                    shard += 1
                writer = wds.TarWriter(str(tmp / "test" / f"{shard}.tar"))
            writer.write(sample)
            n += 1
        if writer is not None:
            writer.close()
            shard += 1
        (tmp / "test" / "nshards.txt").write_text(f"{shard}\n")
        if classnames is not None:
            (tmp / "classnames.txt").write_text("\n".join(classnames) + "\n", encoding="utf-8")
        if templates is not None:
            (tmp / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n", encoding="utf-8")
        if dataset_type != CLASSIFICATION:
            (tmp / "dataset_type.txt").write_text(dataset_type + "\n")
        (tmp / "build.json").write_text(json.dumps({**(build_info or {}), "n": n}, indent=2, sort_keys=True))
        if folder.exists():
            old = folder.with_name(f".tmp-old-{folder.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
        return n
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _fingerprint(paths: list[Path], extra: dict) -> str:
    h = hashlib.sha256(json.dumps({**extra, "v": BUILD_VERSION}, sort_keys=True).encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _up_to_date(folder: Path, fingerprint: str) -> bool:
    try:
        info = json.loads((folder / "build.json").read_text())
    except (OSError, ValueError):
        return False
    return info.get("fingerprint") == fingerprint and (folder / "test" / "nshards.txt").is_file()


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format; gzip or plain). Hand-written: it is a 4-line format and
    no installed library reads it (torchvision's reader wants its own dataset folder layout)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise CurateError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise CurateError(f"{path}: truncated ({body.size} bytes for shape {dims})")
    return body.reshape(dims)


# --------------------------------------------------------------------------------------------
# build-offline
# --------------------------------------------------------------------------------------------


@dataclass
class BuildOfflineConfig:
    out: Path
    pool_dir: Path | None = None
    fashion_mnist_dir: Path = field(default_factory=lambda: Path(
        os.environ.get("CURATE_FASHION_MNIST", str(FASHION_MNIST_DIR))))
    limit: int | None = None  # cap samples per task (tests, quick looks); None = full sets
    force: bool = False


def _build_fashion_mnist(cfg: BuildOfflineConfig, task: Task) -> dict:
    imgs_p = cfg.fashion_mnist_dir / "t10k-images-idx3-ubyte.gz"
    lbls_p = cfg.fashion_mnist_dir / "t10k-labels-idx1-ubyte.gz"
    if not imgs_p.is_file() or not lbls_p.is_file():
        raise MissingDependencyError(f"Fashion-MNIST ({imgs_p})", "sudo apt-get install dataset-fashion-mnist")
    folder = cfg.out / task.folder
    fp = _fingerprint([imgs_p, lbls_p], {"limit": cfg.limit})
    if not cfg.force and _up_to_date(folder, fp):
        return {"status": "up_to_date", "n": json.loads((folder / "build.json").read_text())["n"]}
    images, labels = read_idx(imgs_p), read_idx(lbls_p)
    if len(images) != len(labels):
        raise CurateError(f"{imgs_p}: {len(images)} images but {lbls_p} has {len(labels)} labels")
    n = len(images) if cfg.limit is None else min(cfg.limit, len(images))
    samples = ({"__key__": f"{i:06d}", "png": _png(images[i]), "cls": str(int(labels[i]))} for i in range(n))
    n = write_evalset(folder, samples, FASHION_MNIST_CLASSES, TEMPLATES[task.key],
                      build_info={"fingerprint": fp, "source": str(imgs_p)})
    return {"status": "built", "n": n}


def _build_digits(cfg: BuildOfflineConfig, task: Task) -> dict:
    try:
        import sklearn
        from sklearn.datasets import load_digits
    except ImportError:
        raise MissingDependencyError("scikit-learn", ".venv/bin/pip install scikit-learn") from None
    folder = cfg.out / task.folder
    fp = _fingerprint([], {"limit": cfg.limit, "sklearn": sklearn.__version__})
    if not cfg.force and _up_to_date(folder, fp):
        return {"status": "up_to_date", "n": json.loads((folder / "build.json").read_text())["n"]}
    d = load_digits()  # bundled with scikit-learn: no download
    # 8x8 pixels valued 0..16, ink high: scale to 0..255 (white digit on black, like MNIST)
    images = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    n = len(images) if cfg.limit is None else min(cfg.limit, len(images))
    samples = ({"__key__": f"{i:06d}", "png": _png(images[i]), "cls": str(int(d.target[i]))} for i in range(n))
    n = write_evalset(folder, samples, [str(i) for i in range(10)], TEMPLATES[task.key],
                      build_info={"fingerprint": fp, "source": f"sklearn {sklearn.__version__} load_digits"})
    return {"status": "built", "n": n}


def animal_mnist_wheel() -> Path:
    """$CURATE_ANIMAL_MNIST, else $CURATE_DEPS/pypi/<wheel>, else <repo>/.deps/pypi/<wheel>."""
    env = os.environ.get("CURATE_ANIMAL_MNIST")
    if env:
        return Path(env)
    deps = os.environ.get("CURATE_DEPS")
    return (Path(deps) if deps else REPO_ROOT / ".deps") / "pypi" / ANIMAL_MNIST_WHEEL


def _restricted_numpy_load(data: bytes, where: str) -> np.ndarray:
    import pickle

    allowed = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in allowed:
                raise CurateError(f"{where}: refuses to unpickle {module}.{name} (only numpy arrays are allowed)")
            if name == "_reconstruct":
                from numpy.core.multiarray import _reconstruct  # noqa: PLC0415 - numpy's own array rebuild

                return _reconstruct
            return getattr(np, name)

    arr = _Unpickler(io.BytesIO(data)).load()
    if not isinstance(arr, np.ndarray):
        raise CurateError(f"{where}: expected a numpy array, got {type(arr).__name__}")
    return arr


def read_animal_mnist(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 28 x 28, labels int) from the animal-mnist wheel, checked by its sha256."""
    import zipfile

    if not wheel.is_file():
        raise MissingDependencyError(f"PyPI animal-mnist 0.4 wheel ({wheel})", ANIMAL_MNIST_INSTALL)
    if sha256_file(wheel) != ANIMAL_MNIST_SHA256:
        raise CurateError(f"{wheel}: sha256 differs from the pinned animal-mnist 0.4 wheel "
                          f"({ANIMAL_MNIST_SHA256[:16]}...); download it again with: {ANIMAL_MNIST_INSTALL}")
    base = "animal_mnist/data/Animal_MNIST/"
    with zipfile.ZipFile(wheel) as z:
        images = _restricted_numpy_load(gzip.decompress(z.read(base + "animal_data_version_3.gz")), str(wheel))
        labels = _restricted_numpy_load(gzip.decompress(z.read(base + "animal_label_version_3.gz")), str(wheel))
    images = np.asarray(images)
    if images.ndim == 2 and images.shape[1] == 784:
        images = images.reshape(-1, 28, 28)
    if images.ndim != 3 or len(images) != len(labels):
        raise CurateError(f"{wheel}: unexpected arrays {images.shape} / {np.shape(labels)}")
    return images.astype(np.uint8), np.asarray(labels).astype(np.int64).reshape(-1)


def _build_animal_mnist(cfg: BuildOfflineConfig, task: Task) -> dict:
    wheel = animal_mnist_wheel()
    folder = cfg.out / task.folder
    if not wheel.is_file():  # optional for the v1 suite: reported as missing, with the install command
        return {"status": "missing", "reason": f"{wheel} not found; install it with: {ANIMAL_MNIST_INSTALL}"}
    fp = _fingerprint([wheel], {"limit": cfg.limit})
    if not cfg.force and _up_to_date(folder, fp):
        return {"status": "up_to_date", "n": json.loads((folder / "build.json").read_text())["n"]}
    images, labels = read_animal_mnist(wheel)
    if labels.min() < 0 or labels.max() >= len(ANIMAL_MNIST_CLASSES):
        raise CurateError(f"{wheel}: labels outside 0..{len(ANIMAL_MNIST_CLASSES) - 1}")
    n = len(images) if cfg.limit is None else min(cfg.limit, len(images))
    # --limit: a seeded sample (the file is sorted by class, so a prefix would be one class)
    pick = np.sort(np.random.default_rng(0).permutation(len(images))[:n]) if n < len(images) else np.arange(n)
    info = {"fingerprint": fp, "source": f"{wheel} (animal-mnist 0.4, MIT)"}
    info["chance"] = chance_levels(task, [int(labels[i]) for i in pick], len(ANIMAL_MNIST_CLASSES))
    samples = ({"__key__": f"{k:06d}", "png": _png(images[i]), "cls": str(int(labels[i]))} for k, i in enumerate(pick))
    n = write_evalset(folder, samples, ANIMAL_MNIST_CLASSES, TEMPLATES[task.key], build_info=info)
    return {"status": "built", "n": n, "chance": info["chance"]}


def _safe_member(base: Path, rel: str, where: str) -> Path:
    """Resolve `rel` under `base`, refusing absolute paths and `..` escapes."""
    p = (base / rel).resolve()
    if not str(rel) or os.path.isabs(rel) or not p.is_relative_to(base.resolve()):
        raise CurateError(f"{where}: image path {rel!r} escapes {base}")
    return p


def _build_pool_task(cfg: BuildOfflineConfig, task: Task) -> dict:
    import pyarrow.parquet as pq

    name = task.key.split("/", 1)[1]
    src = Path(cfg.pool_dir) / "evalsets" / name
    index = src / "index.parquet"
    if not index.is_file():
        return {"status": "missing", "reason": f"{index} not found"}
    folder = cfg.out / task.folder
    fp = _fingerprint([index] + ([src / "classnames.txt"] if (src / "classnames.txt").is_file() else []),
                      {"limit": cfg.limit})
    if not cfg.force and _up_to_date(folder, fp):
        return {"status": "up_to_date", "n": json.loads((folder / "build.json").read_text())["n"]}
    table = pq.read_table(index)
    cols = set(table.column_names)
    need = {"image", "caption"} if task.type == RETRIEVAL else {"image", "label"}
    if need - cols:
        raise CurateError(f"{index}: missing column(s) {sorted(need - cols)} (has {sorted(cols)})")
    rows = table.to_pylist()
    if not rows:  # a held-out split the pool's data left empty: the task is missing, not failed
        return {"status": "missing", "reason": f"{index} has no rows"}
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    classnames = None
    if task.type != RETRIEVAL:
        classnames = _read_lines(src / "classnames.txt")
        if not classnames:
            raise CurateError(f"{src / 'classnames.txt'} is missing or empty")
    skipped: list[dict] = []
    build_info = {"fingerprint": fp, "source": str(src), "skipped": skipped}
    labels: list[int] = []

    def samples():
        yield from _pool_samples()
        if task.suite == OFFLINE_V2:  # runs before write_evalset writes build.json
            build_info["chance"] = chance_levels(task, labels, len(classnames) if classnames else len(labels))

    def _pool_samples():
        for i, row in enumerate(rows):
            where = f"{index} row {i}"
            path = _safe_member(src, str(row["image"]), where)
            try:
                data = path.read_bytes()
                decode_image(data)
            except (OSError, ValueError) as e:
                skipped.append({"row": i, "image": row["image"], "reason": str(e)})
                continue
            ext = path.suffix.lower().lstrip(".")
            ext = "jpg" if ext == "jpeg" else ext
            if ext not in IMAGE_EXTS:
                skipped.append({"row": i, "image": row["image"], "reason": f"unsupported image type .{ext}"})
                continue
            s = {"__key__": f"{i:06d}", ext: data}
            if task.type == RETRIEVAL:
                caption = str(row["caption"] or "").replace("\n", " ").strip()
                if not caption:
                    skipped.append({"row": i, "image": row["image"], "reason": "empty caption"})
                    continue
                s["txt"] = caption
                labels.append(len(labels))
            else:
                label = row["label"]
                if label is None or not 0 <= int(label) < len(classnames):
                    raise CurateError(f"{where}: label {label!r} outside 0..{len(classnames) - 1} "
                                      f"({len(classnames)} class names in classnames.txt)")
                s["cls"] = str(int(label))
                labels.append(int(label))
            yield s

    n = write_evalset(folder, samples(), classnames, TEMPLATES.get(task.key),
                      dataset_type=RETRIEVAL if task.type == RETRIEVAL else CLASSIFICATION,
                      build_info=build_info)
    out = {"status": "built", "n": n, "skipped": len(skipped)}
    if "chance" in build_info:
        out["chance"] = build_info["chance"]
    return out


def chance_levels(task: Task, labels: list[int], n_classes: int) -> dict:
    """Expected metrics of a random scorer on the set as built (uniform over its classes / items).

    Classification: acc1 = mean_per_class_recall = 1/C, acc5 = 5/C; also the majority-class acc1
    (what always answering the most common class scores), mrr = H_C / C. Retrieval (one caption per image):
    recall@k = min(k, n)/n both ways, mrr = H_n / n. "main" is the value for the task's main metric.
    """
    from benchmark.metrics import chance_mrr

    n = len(labels)
    if task.type == RETRIEVAL:
        out = {}
        for k in (1, 5, 10):
            r = min(k, n) / n if n else None
            out[f"image_retrieval_recall@{k}"] = out[f"text_retrieval_recall@{k}"] = r
        out["mean_recall@1"] = out["image_retrieval_recall@1"]
        out["image_retrieval_mrr"] = out["text_retrieval_mrr"] = out["mean_mrr"] = chance_mrr(n) if n else None
    else:
        c = max(1, n_classes)
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=c) if n else np.zeros(c)
        out = {"acc1": 1 / c, "acc5": min(5, c) / c if c >= 5 else None, "mean_per_class_recall": 1 / c,
               "majority_acc1": float(counts.max() / n) if n else None, "mrr": chance_mrr(c)}
    out["main"] = out.get(task.main_metric)
    return out


def _labels_in_shards(folder: Path) -> list[int]:
    """The .cls labels of a built task folder (for chance levels of sets built elsewhere)."""
    import tarfile

    labels = []
    for shard in sorted((folder / "test").glob("*.tar"), key=lambda p: (len(p.name), p.name)):
        with tarfile.open(shard) as tf:
            for m in tf:
                if m.name.endswith(".cls"):
                    labels.append(int(tf.extractfile(m).read().decode().strip()))
    return labels


def _suite_v2_summary(cfg: "BuildOfflineConfig", summary: dict) -> dict:
    """offline_suite_v2.json: each v2 task's group, reason, size and chance level as built."""
    tasks = {}
    for group, keys in SUITE_V2_GROUPS.items():
        for key in keys:
            info = summary.get(key, {})
            task = TASKS[key]
            entry = {"group": group, "reason": SUITE_V2_REASONS[key], "status": info.get("status"),
                     "n": info.get("n"), "main_metric": task.main_metric}
            folder = cfg.out / task.folder
            if info.get("status") in ("built", "up_to_date") and (folder / "build.json").is_file():
                built = json.loads((folder / "build.json").read_text())
                chance = built.get("chance")
                if chance is None:  # out-of-domain sets are built by their own builders
                    classnames = _read_lines(folder / "classnames.txt") or []
                    chance = chance_levels(task, _labels_in_shards(folder), len(classnames))
                entry["chance"] = chance
            tasks[key] = entry
    return {"headline": SUITE_V2_HEADLINE, "groups": SUITE_V2_GROUPS, "tasks": tasks}


_BUILDERS = {
    "offline/fashion_mnist": _build_fashion_mnist,
    "offline/digits": _build_digits,
    "offline_v2/animal_silhouettes": _build_animal_mnist,
}


def build_offline(cfg: BuildOfflineConfig) -> dict:
    """Build every offline task into cfg.out; return {task key: {"status", "n", ...}}."""
    cfg.out = Path(cfg.out)
    cfg.out.mkdir(parents=True, exist_ok=True)
    summary = {}
    # suite v2 goes with a large pool: built when --pool-dir holds its splits (curate pool
    # build-offline --size large / large-mini), so the v1 suite's commands build what they did
    v2_pool = cfg.pool_dir is not None and any(
        (Path(cfg.pool_dir) / "evalsets" / k.split("/", 1)[1] / "index.parquet").is_file()
        for k in OFFLINE_V2_KEYS if k not in OFFLINE_KEYS)
    for key in OFFLINE_KEYS + [k for k in OFFLINE_V2_KEYS if k not in OFFLINE_KEYS]:
        task = TASKS[key]
        if key not in OFFLINE_KEYS and not v2_pool:
            summary[key] = {"status": "missing",
                            "reason": "suite v2: give --pool-dir a `curate pool build-offline --size large` pool"}
        elif key in _BUILDERS:
            summary[key] = _BUILDERS[key](cfg, task)
        elif cfg.pool_dir is None:
            summary[key] = {"status": "missing", "reason": "no --pool-dir given (held-out split of the pool build)"}
        else:
            summary[key] = _build_pool_task(cfg, task)
    write_json(cfg.out / "offline_suite.json", summary)
    write_json(cfg.out / "offline_suite_v2.json", _suite_v2_summary(cfg, summary))
    return summary


@click.command("build-offline")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Evalsets folder to write (default: $CURATE_EVALSETS or <repo>/work/evalsets).")
@click.option("--pool-dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Offline pool build folder; its evalsets/<task>/ held-out splits become tasks "
                   "(emoji_category, flags_country, tuxpaint_retrieval).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many samples per task.")
@click.option("--force", is_flag=True, help="Rebuild even when the sources are unchanged.")
def build_offline_cmd(out, pool_dir, limit, force):
    """Build the offline zero-shot suite from real local data, in DataComp's evaluation layout.

    Fashion-MNIST test set (Debian dataset-fashion-mnist), scikit-learn's 1,797 handwritten digits
    (an MNIST stand-in), and the pool build's held-out splits. Score them with
    `curate evaluate --tasks offline`. Re-running with unchanged sources does nothing.

    Suite v2: with a `--size large` (or large-mini) pool as --pool-dir, also its in-domain and
    style-shift sets, plus Animal-MNIST silhouettes; each task's chance level goes to its build.json
    and to offline_suite_v2.json (groups and headline: benchmark/tasks.py). Score them with
    `curate evaluate --tasks offline_v2`.
    """
    out = out or default_evalsets_dir()
    summary = build_offline(BuildOfflineConfig(out=out, pool_dir=pool_dir, limit=limit, force=force))
    for key, info in summary.items():
        extra = f" ({info['skipped']} skipped, see build.json)" if info.get("skipped") else ""
        what = {"built": f"built, {info.get('n')} samples", "up_to_date": f"already up to date, {info.get('n')} samples",
                "missing": f"not built: {info.get('reason')}"}[info["status"]]
        if info.get("chance"):
            extra += f" (chance {TASKS[key].main_metric} {info['chance']['main']:.4f})"
        click.echo(f"{key:32s} {what}{extra}")
    click.echo(f"wrote {out}")


# --------------------------------------------------------------------------------------------
# download (users with internet; not exercised in tests)
# --------------------------------------------------------------------------------------------


@dataclass
class DownloadConfig:
    out: Path
    tasks: list[str] | None = None
    max_bytes: int = 32 << 30  # per file; the largest DataComp shard set file is a few GB
    allow_loopback: bool = False  # address guard (curate.core.address_guard): allow 127.0.0.0/8 and ::1
    allow_cidrs: tuple[str, ...] = ()  # address guard: networks allowed besides global addresses

    def __post_init__(self) -> None:
        self.allow_cidrs = self.guard().allow_cidrs  # validated (a bad CIDR is a CurateError)

    def guard(self):
        from curate.core.address_guard import AddressGuard

        return AddressGuard(allow_loopback=bool(self.allow_loopback), allow_cidrs=tuple(self.allow_cidrs or ()))


def _https(url: str) -> str:
    if not url.startswith("https://"):
        raise CurateError(f"refusing to download non-https URL {url}")
    return url


def _open(url: str, guard):
    """GET an https URL through the address guard (every redirect re-checked, https only, 10 hops at most).

    urllib rather than `requests`: the guard pins the connection to the address it checked by replacing
    http.client's connect, which `requests` (urllib3) has no hook for. A blocked host is a CurateError.
    """
    import urllib.request

    from curate.core.address_guard import LimitedRedirects, blocked_reason

    req = urllib.request.Request(_https(url), headers={"User-Agent": "curate-evalsets"})
    try:
        return guard.opener(LimitedRedirects(10, schemes=("https",))).open(req, timeout=60)
    except OSError as e:  # URLError and HTTPError are OSErrors
        why = blocked_reason(e)
        if why:
            raise CurateError(f"{url}: {why}") from None
        raise


def _fetch(url: str, dest: Path, max_bytes: int, sha256: str | None = None, guard=None) -> None:
    from curate.core.address_guard import AddressGuard
    from curate.core.atomic import atomic_path

    h = hashlib.sha256()
    with _open(url, guard or AddressGuard()) as r:
        size = 0
        with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
            while chunk := r.read(1 << 20):
                size += len(chunk)
                if size > max_bytes:
                    raise CurateError(f"{url}: larger than the {max_bytes} byte cap")
                h.update(chunk)
                fh.write(chunk)
            if sha256 and h.hexdigest() != sha256:
                raise CurateError(f"{url}: sha256 mismatch (got {h.hexdigest()}, expected {sha256})")


def _lfs_pointer(url: str, guard=None) -> tuple[str | None, int | None]:
    """Expected sha256 and size of a Git LFS file (the raw URL returns its pointer text)."""
    import urllib.error

    from curate.core.address_guard import AddressGuard

    try:
        with _open(url, guard or AddressGuard()) as r:
            text = r.read(1 << 16).decode("utf-8", "replace") if r.status == 200 else ""
    except urllib.error.HTTPError:
        return None, None
    if not text.startswith("version"):
        return None, None
    info = dict(line.split(" ", 1) for line in text.splitlines() if " " in line)
    oid = info.get("oid", "")
    return (oid.split(":", 1)[1] if ":" in oid else None), int(info.get("size", 0)) or None


def download(cfg: DownloadConfig) -> dict:
    """Fetch DataComp's evaluation sets into cfg.out (skips shards whose checksum already matches)."""
    from benchmark.tasks import DATACOMP_KEYS

    keys = [get_task(k).key for k in cfg.tasks] if cfg.tasks else DATACOMP_KEYS
    guard = cfg.guard()
    summary = {}
    for key in keys:
        task = TASKS[key]
        if not task.download:
            summary[key] = "no download source (offline task: use build-offline)"
            continue
        if task.type == WINOGAVIL:
            summary[key] = _download_winogavil(cfg, task)
            continue
        repo = task.download.format(folder=task.folder).split("huggingface.co/datasets/", 1)[1].split()[0]
        base = f"https://huggingface.co/datasets/{repo}"
        folder = Path(cfg.out) / task.folder
        (folder / "test").mkdir(parents=True, exist_ok=True)
        try:
            for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
                if task.type != RETRIEVAL:
                    _fetch(f"{base}/raw/main/{name}", folder / name, 1 << 24, guard=guard)
            _fetch(f"{base}/raw/main/test/nshards.txt", folder / "test" / "nshards.txt", 1 << 10, guard=guard)
            n = int((folder / "test" / "nshards.txt").read_text().strip())
            for i in range(n):
                dest = folder / "test" / f"{i}.tar"
                sha, size = _lfs_pointer(f"{base}/raw/main/test/{i}.tar", guard)
                if dest.is_file() and sha and dest.stat().st_size == size and sha256_file(dest) == sha:
                    continue
                _fetch(f"{base}/resolve/main/test/{i}.tar", dest, cfg.max_bytes, sha, guard=guard)
            if task.type == RETRIEVAL:
                write_text(folder / "dataset_type.txt", "retrieval\n")
            summary[key] = f"ok, {n} shards"
        except Exception as e:  # one failed task must not stop the others; report it
            summary[key] = f"failed: {e}"
    return summary


def _download_winogavil(cfg: DownloadConfig, task: Task) -> str:
    """Convert the Hugging Face WinoGAViL test split to our layout (needs the `datasets` package)."""
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError("the `datasets` package (for WinoGAViL)", ".venv/bin/pip install datasets") from None
    ds = datasets.load_dataset("nlphuji/winogavil", split="test", cache_dir=str(Path(cfg.out) / "hf_cache"))

    def samples():
        for i, ex in enumerate(ds):
            s = {"__key__": f"{i:06d}", "json": json.dumps({
                "cue": ex["cue"], "candidates": list(ex["candidates"]), "associations": list(ex["associations"])})}
            for j, img in enumerate(ex["candidate_images"]):
                buf = io.BytesIO()
                img.convert("RGB").save(buf, format="JPEG", quality=95)
                s[f"{j}.jpg"] = buf.getvalue()
            yield s

    n = write_evalset(Path(cfg.out) / task.folder, samples(), None, None, dataset_type="winogavil")
    return f"ok, {n} instances"


@click.command("download")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Evalsets folder (default: $CURATE_EVALSETS or <repo>/work/evalsets).")
@click.option("--tasks", "tasks", multiple=True, help="Task keys (default: all DataComp tasks). Repeatable.")
@click.option("--allow-loopback", is_flag=True, help="Let the address guard allow 127.0.0.0/8 and ::1.")
@click.option("--allow-cidr", "allow_cidrs", multiple=True, metavar="CIDR",
              help="Let the address guard allow this network too (e.g. a local mirror). Repeatable.")
def download_cmd(out, tasks, allow_loopback, allow_cidrs):
    """Download DataComp's evaluation sets (needs internet; ~100 GB for all 40 tasks).

    Shards already on disk with a matching checksum are skipped, so an interrupted download resumes.
    Every fetch and redirect goes through the address guard (as in `curate download`): only https, and only
    globally routable addresses unless --allow-loopback / --allow-cidr say otherwise. Proxies from
    https_proxy/no_proxy are used; the guard checks the target host before the proxy is contacted.
    WinoGAViL comes through the `datasets` library's own client from huggingface.co, outside the guard.
    """
    summary = download(DownloadConfig(out=out or default_evalsets_dir(), tasks=list(tasks) or None,
                                      allow_loopback=allow_loopback, allow_cidrs=tuple(allow_cidrs)))
    for key, status in summary.items():
        click.echo(f"{key:50s} {status}")
