"""curate: DataComp-style image-text dataset curation and benchmarking.

Data flow (each stage is a package under curate/, each a CLI subcommand):
urls.parquet -> download -> POOL -> embed -> filter --recipe -> SUBSET -> reshard -> train -> evaluate -> submit

The Python API: every stage's function and config dataclass is importable from here, whatever module it lives
in, so notebooks and scripts do not break when the code moves::

    import curate
    s = curate.filter_pool(curate.FilterConfig(recipe="recipes/no_filter.yaml", pool="work/pool"))

Two stage functions carry a longer name here because their package already has the short one:
`curate.embed_pool` is `curate.embed.stage.embed` and `curate.reshard_subset` is `curate.reshard.stage.reshard`.

Names are resolved lazily (PEP 562): `import curate` and `curate --help` import no torch, Ray or DuckDB; a stage's
module is imported the first time one of its names is used.
"""

from __future__ import annotations

import importlib
from typing import Any

from curate.core.version import __version__

# public name -> "module:attribute", in data-flow order
API: dict[str, str] = {
    # errors
    "CurateError": "curate.core.errors:CurateError",
    "MachineFailure": "curate.core.errors:MachineFailure",
    # pools
    "OfflinePoolConfig": "curate.pool.offline.build:OfflinePoolConfig",
    "build_offline_pool": "curate.pool.offline.build:build_offline",
    "DownloadConfig": "curate.pool.download:DownloadConfig",
    "download": "curate.pool.download:download",
    "verify_pool": "curate.pool.verify:verify_pool",
    "ImportConfig": "curate.pool.datacomp:ImportConfig",
    "import_datacomp": "curate.pool.datacomp:import_datacomp",
    # embed
    "EmbedConfig": "curate.embed.stage:EmbedConfig",
    "embed_pool": "curate.embed.stage:embed",
    # filter
    "load_recipe": "curate.filter.recipe:load_recipe",
    "FilterConfig": "curate.filter.engine:FilterConfig",
    "filter_pool": "curate.filter.engine:filter_pool",
    "SelectConfig": "curate.filter.datacomp_select:SelectConfig",
    "select_uids": "curate.filter.datacomp_select:select_uids",
    # reshard
    "ReshardConfig": "curate.reshard.stage:ReshardConfig",
    "reshard_subset": "curate.reshard.stage:reshard",
    # benchmark: train, evaluate, submit
    "get_scale": "benchmark.scales:get_scale",
    "TrainConfig": "benchmark.train:TrainConfig",
    "train": "benchmark.train:train",
    "BuildOfflineConfig": "benchmark.evalsets:BuildOfflineConfig",
    "build_offline_evalsets": "benchmark.evalsets:build_offline",
    "EvalConfig": "benchmark.evaluate:EvalConfig",
    "evaluate": "benchmark.evaluate:evaluate",
    "SubmitConfig": "benchmark.submit:SubmitConfig",
    "submit": "benchmark.submit:submit",
    "VerifyConfig": "benchmark.submit:VerifyConfig",
    "verify": "benchmark.submit:verify",
    # orchestration
    "RunConfig": "curate.run.pipeline:RunConfig",
    "run_recipe": "curate.run.pipeline:run_recipe",
    "ScorerConfig": "curate.run.scorer:ScorerConfig",
    "train_scorer": "curate.run.scorer:train_scorer",
    "DemoConfig": "curate.run.demo:DemoConfig",
    "demo": "curate.run.demo:demo",
}

__all__ = ["__version__", *API]


def __getattr__(name: str) -> Any:
    target = API.get(name)
    if target is None:
        raise AttributeError(f"module 'curate' has no attribute {name!r}")
    module, attr = target.split(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(API))
