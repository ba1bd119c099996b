"""`curate evaluate` encodes through curate.clip.models (the one encode path, shared with embed and the filter's
target images), which trims each text batch to its longest caption. Evaluation scores must stay within 1e-3
of the untrimmed path evaluate used before (issue 16): checked here on the offline suite, old and new path
side by side on the same model and sets."""

from __future__ import annotations

import numpy as np
import pytest

from benchmark import evalsets as E
from benchmark.evaluate import EvalConfig, evaluate, read_results
from benchmark.tasks import OFFLINE_KEYS
from curate.clip import models
from tests.benchmark.test_evalsets import make_pool_evalsets
from tests.run_factory import random_checkpoint

ARCH = "curate-debug"


CALLS = {"trimmed": 0, "untrimmed": 0}
_TRIMMED = models.encode_text_trimmed


def _untrimmed(model, tokens):
    """The text path evaluate had before the shared one: the model's own encode_text over all 77 positions."""
    CALLS["untrimmed"] += 1
    return model.encode_text(tokens)


def _trimmed(model, tokens):
    CALLS["trimmed"] += 1
    return _TRIMMED(model, tokens)


def _metrics(path) -> dict[tuple[str, str], float]:
    return {(task, name): float(v) for task, r in read_results(path).items() for name, v in r["metrics"].items()
            if isinstance(v, (int, float)) and v is not None}


def test_trimmed_text_encoding_keeps_offline_suite_scores_within_1e_3(tmp_path, monkeypatch):
    ckpt = random_checkpoint(tmp_path / "model.pt", 0, ARCH)
    ev = tmp_path / "evalsets"
    E.build_offline(E.BuildOfflineConfig(out=ev, pool_dir=make_pool_evalsets(tmp_path / "pool", n_per_class=4),
                                         limit=60))

    def run(out):
        return evaluate(EvalConfig(model=ARCH, pretrained=str(ckpt), tasks=["offline"], evalsets=ev, out=out,
                                   num_workers=0, device="cpu", progress=False))

    with monkeypatch.context() as m:
        m.setattr(models, "encode_text_trimmed", _trimmed)
        new = run(tmp_path / "new.jsonl")
    with monkeypatch.context() as m:
        m.setattr(models, "encode_text_trimmed", _untrimmed)
        old = run(tmp_path / "old.jsonl")
    # both runs went through the shared encode path, each with its own text rule
    assert CALLS["trimmed"] > 0 and CALLS["untrimmed"] > 0
    assert set(new["computed"]) == set(old["computed"]) == set(OFFLINE_KEYS)
    a, b = _metrics(tmp_path / "new.jsonl"), _metrics(tmp_path / "old.jsonl")
    assert set(a) == set(b) and len(a) >= 10
    worst = max(a, key=lambda k: abs(a[k] - b[k]))
    assert abs(a[worst] - b[worst]) <= 1e-3, (worst, a[worst], b[worst])

    # the features themselves: trimming drops only positions after the batch's last end token
    lm = models.load_model(ARCH, str(ckpt), "cpu")
    tok = lm.tokenizer(["a", "a picture of thing number 11", "red things"])
    with monkeypatch.context() as m:
        m.setattr(models, "encode_text_trimmed", _untrimmed)
        full = models.encode_texts(lm.model, tok).numpy()
    trimmed = models.encode_texts(lm.model, tok).numpy()
    assert np.abs(trimmed - full).max() == pytest.approx(0.0, abs=1e-5)
