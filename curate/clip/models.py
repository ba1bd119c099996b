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


def create_model_for_training(arch: str, device: str = "cpu"):
    """(model, train transform, eval transform) of `arch` with fresh weights, for benchmark/train.py.

    Here so that every open_clip model of the project is built by this module (the project's
    architectures registered, one place to change the factory call); tests/test_layout.py enforces it."""
    import open_clip

    register_configs()
    if arch not in open_clip.list_models():
        raise CurateError(f"unknown model architecture {arch!r} (`python -c 'import open_clip; "
                          f"print(open_clip.list_models())'` lists all)")
    return open_clip.create_model_and_transforms(arch, pretrained=None, device=device)


# ---------------------------------------------------------------- the one encode path
# embed (pool images and captions), the filter's target images and evaluate all encode through these, so
# the three agree on normalisation, precision and text trimming.


def autocast(device: str):
    """fp16 mixed precision on CUDA, exact fp32 on CPU (CPU autocast is slower on most processors).

    fp16 rather than bf16: it is what DataComp's evaluation (clip_benchmark's amp) and our training use, so
    scores stay comparable with published ones, and its 10-bit mantissa is closer to the float16 the
    embeddings are stored in than bf16's 7 bits; CLIP's layer norms and softmax stay fp32 under autocast."""
    import contextlib

    import torch

    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def encode_text_trimmed(model, tokens):
    """`model.encode_text` computed only up to the batch's longest caption.

    Exact for open_clip's `CLIP` with a causal mask and argmax (end-token) pooling: a position
    never attends to later ones, so the padding after the last end token cannot change the pooled
    features (floating-point sums over fewer masked positions may differ in the last bits; evaluation
    scores stay within 1e-3, tests/benchmark/test_evaluate_encode.py). Other text towers fall back to
    the model's own encode_text.
    """
    import open_clip
    import torch

    if not (isinstance(model, open_clip.CLIP) and model.text_pool_type == "argmax" and model.attn_mask is not None):
        return model.encode_text(tokens)
    length = int(tokens.argmax(dim=-1).max().item()) + 1
    tokens = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
    return x


def encode_images(model, images):
    """L2-normalised float32 image embeddings of a batch of preprocessed images (on the images' device)."""
    import torch
    import torch.nn.functional as F

    with torch.inference_mode(), autocast(images.device.type):
        return F.normalize(model.encode_image(images).float(), dim=-1)


def encode_texts(model, tokens):
    """L2-normalised float32 text embeddings of a batch of tokens, trimmed to its longest caption."""
    import torch
    import torch.nn.functional as F

    with torch.inference_mode(), autocast(tokens.device.type):
        return F.normalize(encode_text_trimmed(model, tokens).float(), dim=-1)


def save_checkpoint(model, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Save weights in a form `open_clip.create_model_and_transforms(arch, pretrained=path)` loads."""
    import torch

    from curate.core.atomic import atomic_path

    state = {"state_dict": model.state_dict()}
    if extra:
        state.update(extra)
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)
