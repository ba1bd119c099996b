"""The `curate` command line.

Subcommands live in the module of the stage they run and are registered here by import path, so
`curate --help` stays fast (torch, ray and faiss are imported only by the command that needs them).
To add a command: write a click command in its stage module and add one line to a registry below.
"""

from __future__ import annotations

import importlib
import logging

import click

from curate.core.version import __version__
from curate.core.errors import environment_error

# name -> ("module:attribute", one-line help shown by --help without importing the module)
COMMANDS: dict[str, tuple[str, str]] = {
    "evaluate": ("benchmark.evaluate:evaluate_cmd", "Zero-shot evaluation on DataComp's 38 tasks and the offline suite; resumable, missing tasks reported."),
    "download": ("curate.pool.download:download_cmd", "Download a URL table into a webdataset POOL on Ray (img2dataset), every row accounted for."),
    "embed": ("curate.embed.stage:embed_cmd", "open_clip image/text embeddings and CLIP scores for a POOL, per shard, resumable."),
    "filter": ("curate.filter.engine:filter_cmd", "Filter a POOL with a YAML recipe into a SUBSET: parquet, uids.npy, per-uid ledger, report."),
    "ledger": ("curate.filter.engine:ledger_cmd", "Expand a SUBSET's compact ledger (large DataComp pools) into per-(uid, step) rows."),
    "diff": ("curate.filter.diff:diff_cmd", "Compare two SUBSETs: counts in each/both/neither and the step that decided each differing uid."),
    "reshard": ("curate.reshard.stage:reshard_cmd", "Copy a SUBSET's samples from the POOL into balanced webdataset shards."),
    "train": ("benchmark.train:train_cmd", "Train CLIP on SUBSET/shards at a fixed-hyperparameter scale (DataComp protocol)."),
    "submit": ("benchmark.submit:submit_command", "Pack a finished RUN into a verifiable submission bundle."),
    "verify": ("benchmark.submit:verify_command", "Check a submission bundle against a pool (uids, size, hashes, hyperparameters)."),
    "leaderboard": ("benchmark.leaderboard:leaderboard_command", "Local DuckDB leaderboard: ranking, --compare A B, --html."),
    "compare": ("benchmark.leaderboard:compare_command", "Is recipe B better than A? Paired differences, 95% intervals, Holm-corrected p, seeds needed."),
    "run": ("curate.run.pipeline:run_cmd", "Recipe to leaderboard in one command: filter, reshard, train, evaluate, submit."),
    "train-scorer": ("curate.run.scorer:train_scorer_cmd", "Train a CLIP filtering network on the pool's trusted subset (offline, DFN-style)."),
    "demo": ("curate.run.demo:demo_cmd", "The whole toolkit on the built-in offline pool, ending in a leaderboard (resumable)."),
}

POOL_COMMANDS: dict[str, tuple[str, str]] = {
    "verify": ("curate.pool.verify:verify_cmd", "Reconcile a POOL: metadata rows = input rows, tars match metadata; non-zero exit if not."),
    "build-offline": ("curate.pool.offline.build:build_offline_cmd", "Build a real, noisy image-text pool from offline sources (openclipart, Tux Paint, Twemoji)."),
    "serve": ("curate.pool.serve:serve_cmd", "Serve a pool's www/ folder over loopback HTTP (the offline stand-in for the web)."),
    "import-datacomp": ("curate.pool.datacomp:import_datacomp_cmd", "Use DataComp's released metadata (parquet + npz embeddings) as a POOL, read in place."),
    "select-datacomp": ("curate.filter.datacomp_select:select_datacomp_cmd", "uids.npy of a CLIP-score recipe on a DataComp POOL, streamed (fast, low memory, no ledger)."),
}

EVALSETS_COMMANDS: dict[str, tuple[str, str]] = {
    "build-offline": ("benchmark.evalsets:build_offline_cmd", "Build the offline zero-shot suite (Fashion-MNIST, digits, pool held-out splits) from real local data."),
    "download": ("benchmark.evalsets:download_cmd", "Download DataComp's evaluation sets (needs internet; resumable, checksummed)."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when invoked."""

    def __init__(self, *args, lazy: dict[str, tuple[str, str]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = lazy if lazy is not None else {}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx, name):
        if name in self.lazy:
            target, _ = self.lazy[name]
            module, attr = target.split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx):
        # A full disk, an unwritable folder or a dead worker is the machine's failure, not a bug:
        # say so in one message (exit 2) instead of a traceback from deep inside a stage.
        # A CurateError is checked too: a dead DataLoader worker is reported by a SIGCHLD handler that
        # raises wherever the main process happens to be, possibly inside a block that turns errors
        # into a CurateError about its own input; the chain still holds the real cause.
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.UsageError):
            raise
        except Exception as e:  # re-raised unchanged unless it is one of those
            err = environment_error(e)
            if err is None or err is e:
                raise
            raise err from e

    def format_commands(self, ctx, formatter):
        rows = []
        for name in self.list_commands(ctx):
            if name in self.lazy:
                rows.append((name, self.lazy[name][1]))
            else:
                cmd = super().get_command(ctx, name)
                if cmd is not None and not cmd.hidden:
                    rows.append((name, cmd.get_short_help_str(formatter.width)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(
    cls=LazyGroup,
    lazy=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@click.version_option(__version__, prog_name="curate")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Curate DataComp-style image-text datasets and benchmark them.

    \b
    Data flow (each arrow is a subcommand):
      urls.parquet --download--> POOL/ (webdataset shards + per-shard metadata)
      POOL --embed--> POOL/embeddings/<model-id>/ (open_clip image/text embeddings, CLIP scores)
      POOL --filter --recipe R.yaml--> SUBSET/ (subset.parquet, uids.npy, decisions ledger, report)
      SUBSET --reshard--> SUBSET/shards --train --scale S--> RUN/ --evaluate--> RUN/eval_results.jsonl
      RUN --submit--> leaderboard

    Start with `curate pool build-offline --out work/pool` to get a real pool that works offline.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.group(cls=LazyGroup, lazy=POOL_COMMANDS)
def pool() -> None:
    """Build, serve and check image-text pools."""


@main.group(cls=LazyGroup, lazy=EVALSETS_COMMANDS)
def evalsets() -> None:
    """Build or fetch zero-shot evaluation sets."""


if __name__ == "__main__":
    main()
