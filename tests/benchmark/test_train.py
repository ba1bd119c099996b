"""curate train: fixed scales, refusal of overrides, resumable to identical weights, open_clip-loadable, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from benchmark.scales import SCALES, get_scale, override, parse_overrides
from benchmark.train import TrainConfig, train, train_cmd
from curate.core.errors import CurateError

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> Path:
    """A resharded subset of 48 samples (2 corrupt images among them): far fewer than `debug` sees."""
    from tests.run_factory import resharded_subset

    return resharded_subset(tmp_path_factory.mktemp("train"), n_shards=2, per_shard=26)[1]


@pytest.fixture(scope="module")
def reference_run(subset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    train(TrainConfig(data=subset, scale="debug", out=out, seed=3, workers=1, progress=False))
    return out


def _state(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_datacomp_scales_are_the_fixed_protocol():
    s, m, l, xl = (SCALES[k] for k in ("small", "medium", "large", "xlarge"))
    assert (s.model, s.samples_seen, s.batch_size, s.lr, s.warmup) == ("ViT-B-32", 12_800_000, 4096, 5e-4, 500)
    assert (m.model, m.samples_seen, m.batch_size) == ("ViT-B-32", 128_000_000, 4096)
    assert (l.model, l.samples_seen, l.batch_size) == ("ViT-B-16", 1_280_000_000, 8192)
    assert (xl.model, xl.samples_seen, xl.batch_size, xl.lr, xl.warmup, xl.beta2) == (
        "ViT-L-14", 12_800_000_000, 90112, 1e-3, 10_000, 0.95)
    for sc in (s, m, l):
        assert (sc.weight_decay, sc.beta1, sc.beta2, sc.eps) == (0.2, 0.9, 0.98, 1e-6)
        assert sc.pool_size == sc.samples_seen
    assert s.steps == 3125 and s.checkpoint_steps()[-1] == 3125
    nano = SCALES["nano"]  # the large offline pool's laptop scale (issue 17): fixed, tied to its pool
    assert (nano.model, nano.samples_seen, nano.batch_size, nano.lr, nano.warmup, nano.pool_size) == (
        "curate-tiny", 40_960, 256, 1e-3, 16, 110_000)
    assert nano.steps == 160
    for name in ("tiny", "nano", "debug"):
        sc = SCALES[name]
        assert sc.cpu_scale and sc.warmup < sc.steps
        assert sc.checkpoint_steps() == sorted(set(sc.checkpoint_steps()))  # distinct, increasing
    with pytest.raises(CurateError, match="unknown scale 'huge'"):
        get_scale("huge")


def test_override_refused_without_unofficial(subset, tmp_path):
    with pytest.raises(CurateError, match="changing lr is refused"):
        override(get_scale("small"), parse_overrides(["lr=1e-3"]), unofficial=False)
    with pytest.raises(CurateError, match="--set 'name=x'"):
        parse_overrides(["name=x"])
    with pytest.raises(CurateError, match="not a valid value for batch_size"):
        parse_overrides(["batch_size=lots"])
    r = CliRunner().invoke(train_cmd, ["--data", str(subset), "--scale", "debug", "--out", str(tmp_path / "r"),
                                       "--set", "lr=0.01"])
    assert r.exit_code == 2 and "--unofficial" in r.output
    assert not (tmp_path / "r").exists()
    r = CliRunner().invoke(train_cmd, ["--data", str(subset), "--scale", "debug", "--out", str(tmp_path / "u"),
                                       "--unofficial", "--set", "samples_seen=64", "--workers", "0",
                                       "--no-progress"])
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "u" / "info.json").read_text())
    assert info["official"] is False and info["overrides"] == {"samples_seen": 64}
    assert info["steps"] == 4 and "UNOFFICIAL" in r.output


def test_debug_run_outputs_and_open_clip_loads(reference_run, subset):
    import open_clip
    import torch

    from curate.clip.models import register_configs

    info = json.loads((reference_run / "info.json").read_text())
    sc = get_scale("debug")
    assert info["status"] == "done" and info["official"] is True and info["scale"] == "debug"
    assert info["seed"] == 3 and info["versions"]["open_clip"] == open_clip.__version__
    assert info["subset_hash"] == __import__("hashlib").sha256((subset / "uids.npy").read_bytes()).hexdigest()
    # samples seen fixed by the scale (256) although the subset holds only 48 samples
    lines = [json.loads(x) for x in (reference_run / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, sc.steps + 1))
    assert lines[-1]["samples_seen"] == sc.samples_seen
    assert all({"loss", "lr", "samples_per_s"} <= set(x) for x in lines)
    assert max(x["lr"] for x in lines) <= sc.lr and lines[-1]["lr"] < lines[sc.warmup]["lr"]  # warmup then cosine
    assert sorted(p.name for p in (reference_run / "checkpoints").glob("*.pt")) == [
        f"epoch_{k}.pt" for k in range(1, sc.num_checkpoints + 1)]
    # plain open_clip loads the final weights and they are the trained ones
    register_configs()
    model, _, _ = open_clip.create_model_and_transforms("curate-debug", pretrained=str(reference_run / "final.pt"))
    trained = _state(reference_run / "final.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), k
    # re-running a finished run does nothing
    r = CliRunner().invoke(train_cmd, ["--data", str(subset), "--scale", "debug", "--out", str(reference_run),
                                       "--seed", "3", "--workers", "1"])
    assert r.exit_code == 0 and "already up to date" in r.output
    # the same RUN folder with another seed is refused, naming the difference
    with pytest.raises(CurateError, match="seed"):
        train(TrainConfig(data=subset, scale="debug", out=reference_run, seed=4, workers=1, progress=False))


@pytest.mark.reliability
def test_sigkill_then_resume_reaches_identical_weights(reference_run, subset, tmp_path):
    import torch

    out = tmp_path / "run"
    env = dict(os.environ, CURATE_FAULT_STEP_SLEEP="0.5", NO_ALBUMENTATIONS_UPDATE="1")
    cmd = [PY, "-m", "curate.cli", "train", "--data", str(subset), "--scale", "debug", "--out", str(out),
           "--seed", "3", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / "checkpoints" / "epoch_1.pt"
    deadline = time.time() + 600  # generous: a shared CI machine may be heavily loaded
    try:
        while not first.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "timeout"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "final.pt").exists()
    assert json.loads((out / "info.json").read_text())["status"] == "running"
    with pytest.raises(CurateError, match="--resume"):
        train(TrainConfig(data=subset, scale="debug", out=out, seed=3, workers=1, progress=False))
    train(TrainConfig(data=subset, scale="debug", out=out, seed=3, workers=1, progress=False, resume=True))
    a, b = _state(reference_run / "final.pt"), _state(out / "final.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    steps = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, get_scale("debug").steps + 1))  # no step logged twice


def test_no_shards_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CurateError, match="no webdataset shards"):
        train(TrainConfig(data=tmp_path / "empty", scale="debug", out=tmp_path / "r", progress=False))


@pytest.mark.slow
def test_ddp_two_gloo_processes(subset, tmp_path):
    """torchrun with 2 CPU processes (gloo): local loss + gather-with-grad, one checkpoint writer."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", NO_ALBUMENTATIONS_UPDATE="1")
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "benchmark.train",
           "--data", str(subset), "--scale", "debug", "--out", str(out), "--workers", "0", "--device", "cpu",
           "--no-progress"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((out / "info.json").read_text())
    assert info["status"] == "done" and info["world_size"] == 2
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert len(lines) == get_scale("debug").steps and lines[-1]["samples_seen"] == 256
    assert (out / "final.pt").exists()
