"""The one table of fixed training hyperparameters per scale (docs/FORMATS.md, "Training runs", names the RUN files).

DataComp's rule is that the training recipe is fixed and only the data changes, so every number
that decides what a benchmark run learns lives here and nowhere else. `small` to `xlarge` copy
DataComp's protocol (ViT-B-32 / B-16 / L-14, AdamW, cosine schedule with warmup, samples seen fixed
per scale, pool size equal to samples seen). `tiny` and `debug` are CPU-sized scales added by this
project: `tiny` was calibrated to give retrieval clearly above chance on the offline data in a few
minutes on 2 cores (see perf/RESULTS.md), `nano` is the laptop-scale benchmark of the large offline pool
(`curate pool build-offline --size large`, ~110k rows; docs/LARGE_POOL.md) and its suite v2, and `debug` runs
in seconds and exists for tests.

Runs may change only the seed, the device and paths; `curate train --unofficial --set key=value`
may override a field and marks the run as unofficial (`override` below).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from curate.core.errors import CurateError


@dataclass(frozen=True)
class Scale:
    """Fixed hyperparameters of one benchmark scale.

    `batch_size` is the global batch (summed over all data-parallel processes), as in DataComp.
    `num_checkpoints` splits training into that many equal parts ("epochs" in open_clip's terms);
    a checkpoint is written at the end of each part and a killed run resumes from the last one.
    """

    name: str
    model: str
    samples_seen: int
    batch_size: int
    lr: float
    warmup: int  # steps
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    num_checkpoints: int = 5
    pool_size: int | None = None  # DataComp: pool size equals samples seen
    grad_checkpointing: bool = False
    cpu_scale: bool = False
    # sample shuffle buffer of the data loader (open_clip's default 5000; the first fifth fills before
    # the first batch). Part of the recipe because it changes which samples share a batch.
    shuffle_buffer: int = 5000

    @property
    def steps(self) -> int:
        """Total optimizer steps: samples seen is fixed, whatever the subset size."""
        return max(1, self.samples_seen // self.batch_size)

    def checkpoint_steps(self) -> list[int]:
        """Steps after which checkpoint 1..num_checkpoints is written (the last one is `steps`)."""
        n = self.num_checkpoints
        return [round(self.steps * k / n) for k in range(1, n + 1)]

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["steps"] = self.steps
        return d


SCALES: dict[str, Scale] = {
    s.name: s
    for s in (
        # DataComp (Gadre et al. 2023, Table 1 / their training/params): fixed, do not edit.
        Scale("small", "ViT-B-32", 12_800_000, 4096, 5e-4, 500, pool_size=12_800_000),
        Scale("medium", "ViT-B-32", 128_000_000, 4096, 5e-4, 500, pool_size=128_000_000),
        Scale("large", "ViT-B-16", 1_280_000_000, 8192, 5e-4, 500, pool_size=1_280_000_000),
        Scale(
            "xlarge", "ViT-L-14", 12_800_000_000, 90112, 1e-3, 10_000, beta2=0.95,
            pool_size=12_800_000_000, grad_checkpointing=True,
        ),
        # CPU scales (this project). tiny: 8M-param CLIP at 64 px, ~350 steps of 256 on 2 cores.
        Scale(
            "tiny", "curate-tiny", 89_600, 256, 1e-3, 35, num_checkpoints=5, cpu_scale=True,
            shuffle_buffer=1000,
        ),
        # nano: the laptop-scale DataComp of the large offline pool (issue 17). Fixed like DataComp's scales: the
        # pool it is defined for (110,000 rows nominal), samples seen tied to it, the tiny model at 64 px (it is
        # known to learn on this data), tiny's lr, warmup 10% of the steps. Samples seen is 40,960 (160 steps of
        # 256, about 0.37 of the pool) rather than DataComp's 1x the pool: that is what lets one run, training plus
        # the whole suite v2, fit about 6.5 minutes on 2 cores (measured ~200 samples/s training on a shared
        # machine), and an experiment of 15 such runs fit a laptop session. Calibration (perf/calibrate_nano.py,
        # seeds >= 1000) admits its tasks; perf/RESULTS.md has the numbers.
        Scale(
            "nano", "curate-tiny", 40_960, 256, 1e-3, 16, num_checkpoints=4, cpu_scale=True, pool_size=110_000,
            shuffle_buffer=2000,
        ),
        # debug: seconds, for tests; learns nothing meaningful.
        Scale("debug", "curate-debug", 256, 16, 1e-3, 2, num_checkpoints=4, cpu_scale=True, shuffle_buffer=32),
    )
}

# Fields a run may never change, even with --unofficial (they identify the scale).
_NOT_OVERRIDABLE = {"name", "cpu_scale", "pool_size"}


def get_scale(name: str) -> Scale:
    try:
        return SCALES[name]
    except KeyError:
        raise CurateError(f"unknown scale {name!r}; known scales: {', '.join(SCALES)}") from None


def parse_overrides(pairs: tuple[str, ...] | list[str]) -> dict[str, object]:
    """Parse `key=value` strings into typed values for `override` (types from the Scale fields)."""
    types = {f.name: f.type for f in dataclasses.fields(Scale)}
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in types or key in _NOT_OVERRIDABLE:
            allowed = sorted(set(types) - _NOT_OVERRIDABLE)
            raise CurateError(f"--set {pair!r}: expected KEY=VALUE with KEY one of {', '.join(allowed)}")
        t = types[key]
        try:
            if "bool" in str(t):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                val: object = raw.lower() in ("true", "1")
            elif "int" in str(t):
                val = int(float(raw)) if "e" in raw.lower() else int(raw)
            elif "float" in str(t):
                val = float(raw)
            else:
                val = raw
        except ValueError:
            raise CurateError(f"--set {pair!r}: {raw!r} is not a valid value for {key} ({t})") from None
        out[key] = val
    return out


def override(scale: Scale, changes: dict[str, object], unofficial: bool) -> Scale:
    """Return `scale` with `changes` applied; refuse unless the run is explicitly unofficial."""
    changes = {k: v for k, v in changes.items() if getattr(scale, k) != v}
    if not changes:
        return scale
    if not unofficial:
        names = ", ".join(sorted(changes))
        raise CurateError(
            f"scale {scale.name!r} fixes its hyperparameters; changing {names} is refused for a benchmark run. "
            "Pass --unofficial to train anyway (the run is then marked official: false)."
        )
    return dataclasses.replace(scale, **changes)
