"""Decode cache for evaluation sets: decoded, resized pixels of one eval set, reused across evaluations.

Why: an experiment evaluates many models (seeds, recipes, checkpoints) on the same eval sets, and for a small
model most of an evaluation's CPU goes to reading PNG/JPEG from tar shards, decoding and resizing them, the
same work every time (perf/RESULTS.md, "Evaluation speed and the decode cache"). The first evaluation of a set
stores the images as the model's preprocessing leaves them just before `ToTensor`: uint8 pixels at the model's
input size (N x C x H x W), in a memory-mapped .npy; every later evaluation with the same set and the same
preprocessing reads that file and normalises on the fly, with no tar read, no decode and no DataLoader.

Exactness: `ToTensor` + `Normalize` is `uint8 -> float32, / 255, - mean, / std`, elementwise; the cache applies
the same operations in the same order to the same uint8 pixels, so cached and uncached tensors are bit-identical
(tests/benchmark/test_decode_cache.py). Only transforms this module can split that way are cached
(`split_preprocess`: Resize / CenterCrop / RGB conversion, then ToTensor, then Normalize: what open_clip's eval
transform is); anything else is evaluated without the cache.

Key: sha256 over the task key, the eval set's build fingerprint (build.json, when curate built the set), a
signature of every shard (curate.core.stage.file_signature: name, size, mtime, hash of the last 64 KiB) and the
preprocessing (each step's class and parameters, Pillow and torchvision versions). The sidecar JSON stores those
parts in full and they are compared on read: a key mismatch never reuses an entry.

Trust: the .npy is written through curate.core.atomic.atomic_path and the sidecar last (it is the completion
marker); the sidecar records the sha256 of the pixel bytes, checked on every read. A missing sidecar, an
unreadable or mis-shaped .npy, a checksum mismatch or a sidecar whose lists disagree with `n` makes the entry
ignored (and removed): the set is decoded again and the entry rewritten. Never trusted half-written.

Bound: the folder is kept under a byte budget (default 2 GiB) by evicting least-recently-used entries (the
sidecar's mtime, touched on every hit; atime is unreliable under relatime/noatime). An entry larger than the
whole budget is not written.

Where: `$CURATE_EVAL_CACHE` (a folder; `off` disables), else `$XDG_CACHE_HOME/curate/eval`, else
`~/.cache/curate/eval`; the budget in bytes from `$CURATE_EVAL_CACHE_BYTES` (0 disables). `curate evaluate
--decode-cache DIR|off --decode-cache-bytes N` override both. The on-disk format is in docs/FORMATS.md,
"Evaluation decode cache".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from curate.core.atomic import TEMP_PREFIX, atomic_path, write_text
from curate.core.stage import file_signature, fingerprint

log = logging.getLogger(__name__)

FORMAT = 1  # version of the entry layout (docs/FORMATS.md); part of the key
ENV_DIR = "CURATE_EVAL_CACHE"
ENV_BYTES = "CURATE_EVAL_CACHE_BYTES"
DEFAULT_MAX_BYTES = 2 << 30
STALE_TEMP_SECONDS = 24 * 3600  # temp files of a killed writer older than this are removed on eviction
_HASH_CHUNK = 64 << 20


def default_dir() -> Path | None:
    """The cache folder from the environment (None when `$CURATE_EVAL_CACHE` is `off`)."""
    env = os.environ.get(ENV_DIR)
    if env is not None and env.strip():
        return None if env.strip().lower() in ("off", "none", "0") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "curate" / "eval"


def default_max_bytes() -> int:
    env = os.environ.get(ENV_BYTES)
    if env is None or not env.strip():
        return DEFAULT_MAX_BYTES
    try:
        return max(0, int(env))
    except ValueError:
        from curate.core.errors import CurateError

        raise CurateError(f"${ENV_BYTES}={env!r}: expected a byte count (an integer)") from None


# --------------------------------------------------------------------------------------------
# Splitting the model's preprocessing at the uint8 pixels
# --------------------------------------------------------------------------------------------


class ToUint8:
    """The geometric part of a split preprocess: PIL image -> resized/cropped RGB -> uint8 tensor (C, H, W).

    A class (not a closure) so DataLoader workers can pickle it; workers then ship uint8 batches, a quarter of
    the float32 bytes."""

    def __init__(self, steps: list):
        self.steps = list(steps)

    def __call__(self, img):
        import torch

        for s in self.steps:
            img = s(img)
        a = np.asarray(img, dtype=np.uint8)
        if a.ndim == 2:
            a = a[:, :, None]
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


@dataclass
class SplitPreprocess:
    """A model transform split into `to_uint8` (decode-side) and `normalise` (batched, on the fly)."""

    to_uint8: ToUint8
    mean: tuple[float, ...]
    std: tuple[float, ...]
    spec: dict  # what the pixels depend on: part of the cache key
    _stats: Any = field(default=None, repr=False)

    def normalise(self, u8):
        """uint8 (B, C, H, W) -> float32, exactly as ToTensor + Normalize compute it per image."""
        import torch

        if self._stats is None:
            self._stats = (torch.as_tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1),
                           torch.as_tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1))
        mean, std = self._stats
        return u8.to(torch.float32).div_(255).sub_(mean).div_(std)


def _step_spec(t) -> dict | None:
    from torchvision import transforms as T

    name = type(t).__name__
    if isinstance(t, T.Resize):
        interp = getattr(t.interpolation, "value", t.interpolation)
        return {"op": "Resize", "size": t.size, "interpolation": str(interp), "max_size": t.max_size,
                "antialias": t.antialias}
    if isinstance(t, T.CenterCrop):
        return {"op": "CenterCrop", "size": list(t.size)}
    if name == "MaybeConvertMode" and type(t).__module__.startswith("open_clip"):
        return {"op": "ConvertMode", "mode": t.mode}
    return None


def split_preprocess(transform) -> SplitPreprocess | None:
    """Split `transform` at the uint8 pixels, or None when it is not [geometry..., ToTensor, Normalize]."""
    try:
        import PIL
        import torchvision
        from torchvision import transforms as T
    except ImportError:
        return None
    steps = getattr(transform, "transforms", None)
    if not isinstance(transform, T.Compose) or not steps or len(steps) < 2:
        return None
    *geo, to_tensor, norm = steps
    tt_name = type(to_tensor).__name__
    if not (isinstance(to_tensor, T.ToTensor)
            or (tt_name == "MaybeToTensor" and type(to_tensor).__module__.startswith("open_clip"))):
        return None
    if not isinstance(norm, T.Normalize) or norm.inplace:
        return None
    specs = [_step_spec(s) for s in geo]
    if any(s is None for s in specs):
        return None
    mean, std = tuple(float(v) for v in norm.mean), tuple(float(v) for v in norm.std)
    spec = {"steps": specs, "mean": mean, "std": std, "pillow": PIL.__version__,
            "torchvision": torchvision.__version__}
    return SplitPreprocess(ToUint8(geo), mean, std, spec)


# --------------------------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------------------------


def entry_key_parts(task_key: str, root: Path, shards: list[Path], spec: dict) -> dict:
    """What an entry's pixels and records depend on (stored in full in the sidecar, compared on read)."""
    build = None
    try:
        build = json.loads((Path(root) / "build.json").read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        pass
    return {"format": FORMAT, "task": task_key, "build_fingerprint": build,
            "shards": [file_signature(s) for s in shards], "preprocess": spec}


def entry_key(parts: dict) -> str:
    return fingerprint(json.dumps(parts, sort_keys=True, default=str))


def _meta_to_json(m):
    if m is None:
        return None
    a = np.asarray(m)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"metadata dtype {a.dtype} is not numeric")
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.reshape(-1).tolist()}


def _meta_from_json(d):
    if d is None:
        return None
    return np.asarray(d["data"], dtype=np.dtype(d["dtype"])).reshape(d["shape"])


@dataclass
class Entry:
    """A cache hit: `pixels` (memory-mapped uint8, N x C x H x W) and the per-sample records."""

    key: str
    pixels: np.ndarray
    keys: list[str]
    labels: np.ndarray
    ok: np.ndarray
    errors: list
    captions: list
    meta: list


class DecodeCache:
    """A folder of entries under a byte budget (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES):
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)

    @classmethod
    def from_settings(cls, folder: str | os.PathLike | None = None, max_bytes: int | None = None,
                      ) -> "DecodeCache | None":
        """The cache named by the arguments, else by the environment; None when disabled."""
        if folder is not None and str(folder).strip().lower() in ("off", "none"):
            return None
        folder = Path(folder) if folder is not None else default_dir()
        max_bytes = default_max_bytes() if max_bytes is None else int(max_bytes)
        if folder is None or max_bytes <= 0:
            return None
        return cls(folder, max_bytes)

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.folder / f"{key}.npy", self.folder / f"{key}.json"

    # ---------------------------------------------------------------- read
    def get(self, parts: dict) -> Entry | None:
        """The entry for `parts`, verified; None (and a damaged entry removed) otherwise."""
        key = entry_key(parts)
        npy, side = self.paths(key)
        if not side.is_file():
            return None
        try:
            info = json.loads(side.read_text(encoding="utf-8"))
            if not isinstance(info, dict) or info.get("key_parts") != json.loads(json.dumps(parts, default=str)):
                log.info("decode cache %s: key parts differ; not reused", side)
                return None
            n = int(info["n"])
            pixels = np.load(npy, mmap_mode="r", allow_pickle=False)
            if pixels.dtype != np.uint8 or list(pixels.shape) != list(info["shape"]) or pixels.shape[0] != n:
                raise ValueError(f"array {pixels.dtype} {pixels.shape} does not match the sidecar")
            if _sha256(pixels) != info["pixels_sha256"]:
                raise ValueError("pixel checksum mismatch")
            lists = [info[k] for k in ("keys", "labels", "ok", "errors", "captions", "meta")]
            if any(len(v) != n for v in lists):
                raise ValueError("a per-sample list has the wrong length")
            entry = Entry(key, pixels, [str(k) for k in info["keys"]], np.asarray(info["labels"], dtype=np.int64),
                          np.asarray(info["ok"], dtype=bool), info["errors"], info["captions"],
                          [_meta_from_json(m) for m in info["meta"]])
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("decode cache entry %s is damaged (%s): ignored, removed and rebuilt", side, e)
            self.remove(key)
            return None
        try:
            os.utime(side)  # LRU: a hit makes the entry recent
        except OSError:
            pass
        return entry

    # ---------------------------------------------------------------- write
    def writer(self, parts: dict, n: int, shape: tuple[int, int, int]) -> "EntryWriter | None":
        """A writer for an entry of `n` images of `shape`, or None when it cannot fit the budget."""
        need = n * int(np.prod(shape)) + 256 * max(n, 1)  # pixels + a generous sidecar estimate
        if n <= 0 or need > self.max_bytes:
            return None
        try:
            return EntryWriter(self, entry_key(parts), parts, n, tuple(shape))
        except OSError as e:
            log.warning("decode cache %s: cannot write (%s); evaluating without it", self.folder, e)
            return None

    def remove(self, key: str) -> None:
        for p in self.paths(key)[::-1]:  # sidecar first: without it the entry is never read
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("decode cache: cannot remove %s (%s)", p, e)

    def entries(self) -> list[tuple[float, int, str]]:
        """(last use, bytes, key) per entry, oldest first; a .npy without sidecar counts as oldest."""
        out: dict[str, list] = {}
        try:
            files = list(self.folder.iterdir())
        except OSError:
            return []
        for p in files:
            if p.name.startswith(TEMP_PREFIX) or p.suffix not in (".npy", ".json"):
                continue
            try:
                st = p.stat()
            except OSError:
                continue
            e = out.setdefault(p.stem, [0.0, 0])
            e[1] += st.st_size
            if p.suffix == ".json":
                e[0] = st.st_mtime
        return sorted((t, b, k) for k, (t, b) in out.items())

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove least-recently-used entries until the folder fits the budget (never `keep`); temp files of
        writers killed more than a day ago go too. Returns the removed keys."""
        now = time.time()
        try:
            for p in self.folder.glob(TEMP_PREFIX + "*"):
                try:
                    if now - p.stat().st_mtime > STALE_TEMP_SECONDS:
                        p.unlink()
                except OSError:
                    pass
        except OSError:
            pass
        entries = self.entries()
        total = sum(b for _, b, _ in entries)
        removed = []
        for _, b, key in entries:
            if total <= self.max_bytes:
                break
            if key == keep:
                continue
            self.remove(key)
            total -= b
            removed.append(key)
        return removed


def _sha256(a: np.ndarray) -> str:
    h = hashlib.sha256()
    flat = a.reshape(-1)
    for i in range(0, flat.shape[0], _HASH_CHUNK):
        h.update(memoryview(np.ascontiguousarray(flat[i:i + _HASH_CHUNK])))
    return h.hexdigest()


class EntryWriter:
    """Fills one entry while the set is decoded for an evaluation; `commit()` publishes it, `abort()` drops it.

    The pixels go straight into a memory-mapped temp .npy (no second copy in memory); the sidecar is written
    last, so an entry is visible only once complete."""

    def __init__(self, cache: DecodeCache, key: str, parts: dict, n: int, shape: tuple[int, int, int]):
        self.cache, self.key, self.parts, self.n, self.shape = cache, key, parts, n, shape
        npy, _ = cache.paths(key)
        self._cm = atomic_path(npy, suffix=".npy")
        tmp = self._cm.__enter__()
        try:
            self._mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, *shape))
        except BaseException as e:
            self._cm.__exit__(type(e), e, e.__traceback__)
            raise
        self._i = 0
        self._hash = hashlib.sha256()
        self._rec: dict[str, list] = {k: [] for k in ("keys", "labels", "ok", "errors", "captions", "meta")}
        self._done = False

    def add(self, u8, keys, labels, ok, errors, captions, metas) -> bool:
        """Append one batch (uint8 tensor B x C x H x W and its records); False (and the entry dropped) when it
        does not fit what the writer was opened for."""
        if self._done:
            return False
        b = len(keys)
        if self._i + b > self.n or tuple(u8.shape[1:]) != self.shape:
            self.abort()
            return False
        try:
            metas_j = [_meta_to_json(m) for m in metas]
        except TypeError:
            self.abort()
            return False
        a = u8.numpy()
        self._mm[self._i:self._i + b] = a
        self._hash.update(memoryview(np.ascontiguousarray(a)))
        self._i += b
        r = self._rec
        r["keys"].extend(str(k) for k in keys)
        r["labels"].extend(int(v) for v in labels)
        r["ok"].extend(bool(v) for v in ok)
        r["errors"].extend(errors)
        r["captions"].extend(list(c) for c in captions)
        r["meta"].extend(metas_j)
        return True

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        del self._mm
        err = RuntimeError("decode cache entry dropped")
        try:
            self._cm.__exit__(RuntimeError, err, None)  # removes the temp file
        except RuntimeError:
            pass

    def commit(self) -> bool:
        """Publish the entry when every one of the `n` images was added; then keep the folder in budget."""
        if self._done:
            return False
        if self._i != self.n:
            self.abort()
            return False
        self._done = True
        self._mm.flush()
        del self._mm
        try:
            self._cm.__exit__(None, None, None)
            _, side = self.cache.paths(self.key)
            info = {"format": FORMAT, "key": self.key, "key_parts": self.parts, "n": self.n,
                    "shape": [self.n, *self.shape], "dtype": "uint8", "pixels_sha256": self._hash.hexdigest(),
                    **self._rec}
            write_text(side, json.dumps(info, sort_keys=True, default=str))  # compact: one list per field
        except OSError as e:
            log.warning("decode cache %s: cannot write (%s)", self.cache.folder, e)
            self.cache.remove(self.key)
            return False
        self.cache.evict(keep=self.key)
        return True
