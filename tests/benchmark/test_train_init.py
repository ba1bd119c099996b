"""`TrainConfig.init_checkpoint`: weights loaded before step 0, an unofficial run, resumable from its checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmark.train import TrainConfig, train
from curate.core.errors import CurateError


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    from tests.run_factory import resharded_subset

    return resharded_subset(tmp_path_factory.mktemp("init"), n_shards=1, per_shard=24)[1]


def _state(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_init_checkpoint_is_loaded_before_step_0_and_resume_still_works(subset, tmp_path):
    import torch

    from curate.core.hashing import sha256_file
    from tests.run_factory import random_checkpoint
    from tests.test_formats import BLOCKS, Checker

    init = random_checkpoint(tmp_path / "init.pt", seed=7)
    # lr 0: AdamW moves nothing (and decays nothing), so the final weights are the loaded ones exactly
    frozen = train(TrainConfig(data=subset, scale="debug", out=tmp_path / "frozen", workers=0, progress=False,
                               unofficial=True, overrides={"lr": 0.0}, init_checkpoint=init))
    a, b = _state(init), _state(tmp_path / "frozen" / "final.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert frozen["official"] is False and frozen["init_checkpoint"]["sha256"] == sha256_file(init)

    # no override: still unofficial (it is not a benchmark run), and the documented info.json form
    ref = tmp_path / "ref"
    info = train(TrainConfig(data=subset, scale="debug", out=ref, workers=0, progress=False, init_checkpoint=init))
    assert info["official"] is False and info["run"]["init_checkpoint_sha256"] == sha256_file(init)
    c = Checker()
    c.json("RUN/info.json", json.loads((ref / "info.json").read_text()), str(ref / "info.json"))
    assert c.problems["RUN/info.json"] == []
    assert "RUN/info.json" in BLOCKS

    # a run killed after checkpoint 2 resumes from it (not from init) to the same weights
    import shutil

    out = tmp_path / "resumed"
    shutil.copytree(ref, out)
    for k in (3, 4):
        (out / "checkpoints" / f"epoch_{k}.pt").unlink()
    (out / "final.pt").unlink()
    i = json.loads((out / "info.json").read_text())
    (out / "info.json").write_text(json.dumps({**i, "status": "running"}))
    train(TrainConfig(data=subset, scale="debug", out=out, workers=0, progress=False, init_checkpoint=init, resume=True))
    a, b = _state(ref / "final.pt"), _state(out / "final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # another init file is another run; a missing one is a clear error
    other = random_checkpoint(tmp_path / "other.pt", seed=8)
    with pytest.raises(CurateError, match="different run"):
        train(TrainConfig(data=subset, scale="debug", out=ref, workers=0, progress=False, init_checkpoint=other,
                          resume=True))
    with pytest.raises(CurateError, match="no such file"):
        train(TrainConfig(data=subset, scale="debug", out=tmp_path / "x", workers=0, progress=False,
                          init_checkpoint=tmp_path / "missing.pt"))
