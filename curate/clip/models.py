"""One place that builds open_clip models, so every stage names and loads them the same way.

Built-in open_clip architectures work as usual; the project adds CPU-sized architectures
(``curate-tiny``, ``curate-debug``) from ``curate/clip/model_configs/*.json``. Weights come from an
open_clip tag (needs the internet; never used in tests) or a local checkpoint path.

A *model id* names embeddings on disk: ``<arch>__<first 12 hex of sha256(weights file)>``, or
``<arch>__<tag>`` for a named tag, or ``<arch>__random-init`` without weights. Changing the weights
changes the id, so stale embeddings are never mistaken for current ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from curate.core.hashing import sha256_file
from curate.core.errors import CurateError

CONFIG_DIR = Path(__file__).parent / "model_configs"


@lru_cache(maxsize=None)
def register_configs() -> None:
    """Make the project's architectures known to open_clip's factory (idempotent)."""
    import open_clip

    open_clip.add_model_config(CONFIG_DIR)


def known_architectures() -> list[str]:
    import open_clip

    register_configs()
    return open_clip.list_models()


@lru_cache(maxsize=64)
def _sha256_file(path: str, mtime_ns: int, size: int) -> str:
    # (mtime, size) are part of the cache key so a rewritten checkpoint is hashed again
    return sha256_file(path)


def weights_sha256(path: str | os.PathLike) -> str:
    st = os.stat(path)
    return _sha256_file(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


def parse_pretrained(values: tuple[str, ...]) -> dict[str, str]:
    """`--pretrained [ARCH=]WEIGHTS` values as {arch: weights}; "" is the key of weights for any architecture.

    A value that is an existing path is taken whole, even if it contains "=".
    """
    out = {}
    for v in values:
        arch, sep, w = v.partition("=")
        if sep and arch and not os.path.exists(v):
            out[arch] = w
        else:
            out[""] = v
    return out


def model_id(arch: str, pretrained: str | None) -> str:
    """Stable folder-safe id of (architecture, weights)."""
    if not pretrained:
        tag = "random-init"
    elif os.path.exists(pretrained):
        tag = weights_sha256(pretrained)[:12]
    else:
        tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in pretrained)
    return f"{arch}__{tag}"


@dataclass
class LoadedModel:
    model: Any
    preprocess: Any  # the eval transform (PIL image -> tensor)
    tokenizer: Any
    arch: str
    pretrained: str | None
    model_id: str
    device: str


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CurateError(f"--device {device}: CUDA is not available on this machine")
    return device


def load_model(arch: str, pretrained: str | None = None, device: str = "auto") -> LoadedModel:
    """Build `arch` with open_clip and load `pretrained` (tag or local checkpoint path).

    Raises CurateError for an unknown architecture or an unreadable checkpoint.
    """
    import open_clip

    register_configs()
    if arch not in open_clip.list_models():
        raise CurateError(
            f"unknown model architecture {arch!r}; known: curate-tiny, curate-debug, ViT-B-32, ViT-L-14, ... "
            f"(`python -c 'import open_clip; print(open_clip.list_models())'` lists all)"
        )
    if pretrained and (os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors", ".pth"))):
        if not os.path.isfile(pretrained):
            raise CurateError(f"--pretrained {pretrained}: checkpoint file not found")
    device = resolve_device(device)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained, device=device)
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint surfaces as pickle/Index/EOF/Runtime errors alike
        if not pretrained:
            raise
        raise CurateError(f"cannot load {arch} weights from {pretrained!r}: {type(e).__name__}: {e}") from None
    model.eval()
    tokenizer = open_clip.get_tokenizer(arch)
    return LoadedModel(model, preprocess, tokenizer, arch, pretrained, model_id(arch, pretrained), device)


def save_checkpoint(model, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Save weights in a form `open_clip.create_model_and_transforms(arch, pretrained=path)` loads."""
    import torch

    from curate.core.atomic import atomic_path

    state = {"state_dict": model.state_dict()}
    if extra:
        state.update(extra)
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)
