"""The shard table `sizes.json` beside a folder of webdataset shards: `{shard file name: samples in that tar}`.

Why this file exists: tools outside curate learn a webdataset's size from it instead of opening every tar.
- DataComp's `resharder.py` reads `--shard-table` (default `sizes.json`, relative to `--input-dir`): a flat
  JSON object whose keys are shard *file names* as its `--shard-format` spells them (default `{:08d}.tar`,
  so `"00000000.tar"`, not shard ids) and whose values are integer sample counts. A shard missing from the
  table falls back to img2dataset's `{:08d}_stats.json` (`"successes"`); with neither, the shard is skipped,
  and with every shard skipped the resharder stops on an IndexError. curate's pools have no `_stats.json`
  files (the downloader converts img2dataset's output to its own layout), so the table is what makes a
  curate pool readable by it.
- open_clip_train (`get_dataset_size`) reads `sizes.json` from the folder of its `--train-data` shards, same
  shape, and sums the entries of the shards it was given.

Both the pool (POOL/shards/sizes.json, written by `curate download`, checked by `curate pool verify`) and a
resharded subset (SUBSET/shards/sizes.json, written by `curate reshard`) use `write_shard_table`, so the two
tables cannot drift apart in shape.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core.atomic import write_json
from curate.core.errors import CurateError

SIZES_FILE = "sizes.json"


def shard_file_name(shard: int) -> str:
    """The shard's tar name, as DataComp's default `--shard-format {:08d}.tar` spells it (the table's key)."""
    return f"{shard:08d}.tar"


def _check_table(table: object, where: str) -> dict[str, int]:
    if not isinstance(table, dict):
        raise CurateError(f"{where}: a shard table must be a JSON object {{shard file name: sample count}}, "
                          f"got {type(table).__name__}")
    for name, count in table.items():
        if not name.endswith(".tar") or "/" in name or "\\" in name or name.startswith("."):
            raise CurateError(f"{where}: key {name!r} is not a shard file name (like 00000000.tar)")
        # bool is an int in Python; a count of `true` is a broken table, not 1
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise CurateError(f"{where}: {name}: sample count {count!r} is not a non-negative integer")
    return dict(table)


def read_shard_table(folder: str | Path) -> dict[str, int] | None:
    """FOLDER/sizes.json as {name: count}; None when absent; CurateError naming the file when malformed."""
    path = Path(folder) / SIZES_FILE
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        table = json.loads(raw)
    except ValueError as e:
        raise CurateError(f"{path}: not valid JSON ({e})") from None
    return _check_table(table, str(path))


def write_shard_table(folder: str | Path, counts: Mapping[str, int]) -> bool:
    """Write FOLDER/sizes.json (atomically) from {shard file name: samples}; True if the file changed.

    A table that already holds exactly these counts is left untouched, so re-running a stage that has
    nothing to do changes no file (the up-to-date runs of download and reshard promise that).
    """
    folder = Path(folder)
    table = _check_table(dict(counts), str(folder / SIZES_FILE))
    try:
        if read_shard_table(folder) == table:
            return False
    except CurateError:
        pass  # a malformed table is simply replaced
    write_json(folder / SIZES_FILE, table)
    return True


def metadata_successes(meta_path: str | Path) -> int:
    """Rows of a pool shard's metadata parquet whose status is `success`: the samples its tar holds."""
    status = pq.read_table(meta_path, columns=["status"])["status"]
    return int(pc.sum(pc.equal(status, "success")).as_py() or 0)
