"""Reproducibility fields: RUN/info.json records what else changes the weights at the same seed and data
(torch's intra-op threads, torch version, device, CPU kind), outside the fingerprint, and `curate evaluate`
shows them with the scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmark.evaluate import format_table
from benchmark.train import TrainConfig, reproducibility, train


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    from tests.run_factory import resharded_subset

    return resharded_subset(tmp_path_factory.mktemp("repro"), n_shards=1, per_shard=20)[1]


def test_info_records_threads_outside_the_fingerprint(subset, tmp_path):
    import torch

    before = torch.get_num_threads()
    out = tmp_path / "run"
    try:
        torch.set_num_threads(1)
        train(TrainConfig(data=subset, scale="debug", out=out, seed=0, workers=0, progress=False))
        info = json.loads((out / "info.json").read_text())
        # the protocol does not fix the thread count: with 2 threads the same run is still the same
        # run (same fingerprint: up to date, not "a different run"), so a resume elsewhere works
        torch.set_num_threads(2)
        again = train(TrainConfig(data=subset, scale="debug", out=out, seed=0, workers=0, progress=False))
        assert reproducibility("cpu")["torch_threads"] == 2
    finally:
        torch.set_num_threads(before)
    r = info["reproducibility"]
    assert r["torch_threads"] == 1 and r["torch"] == torch.__version__ and r["device"] == "cpu" and r["cpu"]
    assert "reproducibility" not in info["run"]  # the fingerprinted fields
    assert again.get("up_to_date") and again["fingerprint"] == info["fingerprint"]


def test_evaluate_table_shows_how_the_run_was_trained():
    summary = {"results": {}, "missing": {}, "aggregates": {},
               "trained_with": {"seed": 3, "torch": "2.9.0", "torch_threads": 2, "device": "cpu", "cpu": "AMD EPYC"}}
    assert "trained with: seed 3, torch 2.9.0, 2 intra-op thread(s), device cpu, CPU AMD EPYC" in format_table(summary)
