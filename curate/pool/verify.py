"""`curate pool verify POOL`: reconcile a pool's input, metadata and tars; non-zero exit when they disagree.

The invariant (issue 3), also checked at the end of every `curate download`:
1. the metadata rows are the input rows: same count and same uid multiset (against the input itself
   when the caller has it, else against the count and uid-multiset digest recorded in pool.json);
2. every `success` row has its complete sample ({key}.jpg, .txt, .json with the same uid) in its shard's tar;
3. no tar holds a sample without a `success` row, and every shard has both its tar and its metadata;
4. the shard table `shards/sizes.json` (curate.pool.shard_table), when present, lists exactly the shards
   that have metadata, each with its count of `success` rows. A pool without it only gets a warning.

Tars are read with the pool's one reader (curate.pool.io.iter_members), headers only but for the small
.json members, and member names are checked (no paths), never used as file names.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import click
import pyarrow.parquet as pq

from curate.core.errors import CurateError
from curate.pool.io import MAX_MEMBER_BYTES, iter_members
from curate.pool.shard_table import SIZES_FILE, read_shard_table, shard_file_name

_MEMBER_RE = re.compile(r"^([0-9]+)\.([a-z0-9.]+)$")
REQUIRED_EXTS = ("jpg", "txt", "json")
# The downloader stores the caption in each sample's json, so the cap is the per-member cap of the pool's
# reader (curate.pool.io.MAX_MEMBER_BYTES), not a smaller one: a 1 MB caption must still verify.
MAX_JSON_BYTES = MAX_MEMBER_BYTES
SHOW = 5  # examples listed per problem


@dataclass
class VerifyReport:
    """Outcome of a reconciliation. `problems` is empty exactly when the pool is consistent."""

    pool: Path
    shards: int = 0
    expected_rows: int | None = None
    metadata_rows: int = 0
    success_rows: int = 0
    tar_samples: int = 0
    status_counts: Counter = field(default_factory=Counter)
    missing_metadata: list[int] = field(default_factory=list)
    missing_tars: list[int] = field(default_factory=list)
    missing_samples: list[str] = field(default_factory=list)  # success rows whose sample is absent/incomplete
    orphan_samples: list[str] = field(default_factory=list)  # tar samples with no success row
    uid_mismatch: list[str] = field(default_factory=list)
    sizes_table: str = "ok"  # "ok", "missing" (a warning) or "wrong" (a problem): shards/sizes.json
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # worth fixing, but every row is still accounted for

    @property
    def ok(self) -> bool:
        return not self.problems

    def table(self) -> str:
        """The human-readable reconciliation."""
        exp = "?" if self.expected_rows is None else str(self.expected_rows)
        rows = [
            ("input rows (expected)", exp, ""),
            ("metadata rows", str(self.metadata_rows), "ok" if self.expected_rows == self.metadata_rows else "MISMATCH"),
        ]
        for st, c in sorted(self.status_counts.items(), key=lambda kv: -kv[1]):
            rows.append((f"  status {st}", str(c), ""))
        rows += [
            ("success rows", str(self.success_rows), ""),
            ("tar samples", str(self.tar_samples), "ok" if self.tar_samples == self.success_rows else "MISMATCH"),
            ("success rows without sample", str(len(self.missing_samples)), "ok" if not self.missing_samples else "FAIL"),
            ("tar samples without row", str(len(self.orphan_samples)), "ok" if not self.orphan_samples else "FAIL"),
            ("shards missing metadata", str(len(self.missing_metadata)), "ok" if not self.missing_metadata else "FAIL"),
            ("shards missing tar", str(len(self.missing_tars)), "ok" if not self.missing_tars else "FAIL"),
            (f"shard table shards/{SIZES_FILE}", self.sizes_table,
             {"ok": "ok", "missing": "WARN"}.get(self.sizes_table, "FAIL")),
        ]
        w = max(len(r[0]) for r in rows)
        lines = [f"reconciliation of {self.pool} ({self.shards} shards)"]
        lines += [f"  {a:<{w}}  {b:>10}  {c}" for a, b, c in rows]
        lines += [f"WARNING: {m}" for m in self.warnings]
        if self.problems:
            lines.append(f"FAILED: {len(self.problems)} problem(s)")
            lines += [f"  - {p}" for p in self.problems[:20]]
            if len(self.problems) > 20:
                lines.append(f"  ... and {len(self.problems) - 20} more")
        else:
            lines.append("OK: every input row is accounted for and tars match metadata")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "pool": str(self.pool), "ok": self.ok, "shards": self.shards, "expected_rows": self.expected_rows,
            "metadata_rows": self.metadata_rows, "success_rows": self.success_rows, "tar_samples": self.tar_samples,
            "status_counts": dict(self.status_counts), "missing_samples": self.missing_samples,
            "orphan_samples": self.orphan_samples, "missing_metadata": self.missing_metadata,
            "missing_tars": self.missing_tars, "sizes_table": self.sizes_table, "problems": self.problems,
            "warnings": self.warnings,
        }


def _examples(items: list[str]) -> str:
    more = f" (+{len(items) - SHOW} more)" if len(items) > SHOW else ""
    return ", ".join(items[:SHOW]) + more


def uid_digest(uids) -> str:
    """Order-free digest of a uid multiset (sorted, newline-joined, sha256); stored in pool.json."""
    h = hashlib.sha256()
    for u in sorted(uids):
        h.update(u.encode() + b"\n")
    return h.hexdigest()


def _scan_tar(path: Path, report: VerifyReport, shard: int) -> dict[str, dict]:
    """key -> {"exts": set, "uid": uid in its json or None}; unsafe or foreign members become problems.

    Through the pool's one reader (curate.pool.io.iter_members) with only the json members read: images
    are passed by seeking, so verifying a pool costs its tar headers and captions, not its image bytes."""
    samples: dict[str, dict] = {}
    errors: list[str] = []
    for m in iter_members(path, read={"json"}, errors=errors, max_member_bytes=MAX_JSON_BYTES):
        match = _MEMBER_RE.match(m.name)
        if m.is_dir or match is None or (m.problem and "is not a regular file" in m.problem):
            report.problems.append(f"shard {shard:08d}: unexpected tar member {m.name!r}")
            continue
        key, ext = match.groups()
        s = samples.setdefault(key, {"exts": set(), "uid": None})
        s["exts"].add(ext)
        if ext == "json":
            if m.data is None:  # over the cap (the reader refused to read it)
                report.problems.append(f"shard {shard:08d}: {m.name} is {m.size} bytes, too large for sample json")
                continue
            try:
                s["uid"] = json.loads(m.data).get("uid")
            except (ValueError, AttributeError):
                report.problems.append(f"shard {shard:08d}: {m.name} is not valid json")
    for e in errors:
        report.problems.append(f"shard {shard:08d}: tar {path.name} cannot be read: {e}")
    return samples


def _sizes_fix(pool: Path, pool_meta: dict) -> str:
    urls = pool_meta.get("input", {}).get("path", "URLS")
    return (f"re-run the `curate download --urls {urls} --out {pool}` command that made this pool, with its options "
            "(pool.json content_settings): on a complete pool it downloads nothing and only rewrites the table "
            "from the metadata")


def _check_sizes_table(report: VerifyReport, pool_meta: dict, successes: dict[int, int]) -> None:
    """Check shards/sizes.json against the metadata: one entry per shard with metadata, count = success rows.

    Missing is a warning, not a failure, the same way verify treats the other things a pool may lack
    (pool.json's uid-multiset digest is checked only when it is there): verify fails when rows are lost,
    duplicated or unreadable, and a missing table loses nothing. It is derived data, rebuilt from the
    metadata by any re-run of `curate download`, and pools written before the table existed are otherwise
    whole. A table that is present but wrong is a failure: DataComp's resharder and open_clip_train trust
    its counts (offsets and epoch sizes), so a wrong one silently mis-sizes whatever reads it.
    """
    try:
        table = read_shard_table(report.pool / "shards")
    except CurateError as e:
        report.sizes_table = "wrong"
        report.problems.append(f"{e}; to fix it, {_sizes_fix(report.pool, pool_meta)}")
        return
    if table is None:
        report.sizes_table = "missing"
        report.warnings.append(f"shards/{SIZES_FILE} is missing: DataComp's resharder cannot size this pool's shards "
                               f"without it (it stops on an IndexError); to write it, {_sizes_fix(report.pool, pool_meta)}")
        return
    shard_of = {shard_file_name(k): k for k in range(report.shards)}
    no_metadata = set(report.missing_metadata)
    wrong = []
    for name, count in sorted(table.items()):
        k = shard_of.get(name)
        if k is None:
            wrong.append(f"{name} is listed but is not a shard of this pool ({report.shards} shards)")
        elif k in no_metadata:
            wrong.append(f"{name} is listed but shard {k:08d} has no metadata")
        elif k in successes and count != successes[k]:
            wrong.append(f"{name} is listed with {count} samples, its metadata has {successes[k]} success rows")
    listed = {shard_of[n] for n in table if n in shard_of}
    for k in sorted(successes.keys() - listed):
        wrong.append(f"{shard_file_name(k)} is not listed (its metadata has {successes[k]} success rows)")
    if wrong:
        report.sizes_table = "wrong"
        report.problems += [f"shards/{SIZES_FILE}: {w}" for w in wrong]
        report.problems.append(f"shards/{SIZES_FILE} disagrees with the metadata in {len(wrong)} entr"
                               f"{'y' if len(wrong) == 1 else 'ies'}; to fix it, {_sizes_fix(report.pool, pool_meta)}")


def verify_pool(pool: str | Path, expected_uids: list[str] | None = None, pool_meta: dict | None = None,
                progress: bool = False) -> VerifyReport:
    """Reconcile POOL; returns a report (never raises for an inconsistent pool, only for a missing one)."""
    pool = Path(pool)
    if pool_meta is None:
        pj = pool / "pool.json"
        try:
            pool_meta = json.loads(pj.read_text())
        except FileNotFoundError:
            raise CurateError(f"{pool}: no pool.json; is this a pool written by `curate download`?") from None
        except ValueError as e:
            raise CurateError(f"{pj}: unreadable ({e})") from None
    n_shards = int(pool_meta["shards"])
    report = VerifyReport(pool=pool, shards=n_shards, expected_rows=pool_meta.get("input", {}).get("rows"))
    all_uids: list[str] = []
    successes: dict[int, int] = {}  # shard -> success rows, for shards whose metadata could be read

    from tqdm import tqdm

    for k in tqdm(range(n_shards), desc="verify", unit="shard", disable=not progress):
        tar_path = pool / "shards" / f"{k:08d}.tar"
        meta_path = pool / "metadata" / f"{k:08d}.parquet"
        if not meta_path.exists():
            report.missing_metadata.append(k)
            report.problems.append(f"shard {k:08d}: metadata {meta_path.name} is missing")
        if not tar_path.exists():
            report.missing_tars.append(k)
            report.problems.append(f"shard {k:08d}: tar {tar_path.name} is missing")
        success: dict[str, str] = {}
        if meta_path.exists():
            try:
                t = pq.read_table(meta_path, columns=["uid", "key", "status", "shard"])
            except Exception as e:  # noqa: BLE001 - any unreadable parquet is a reported problem
                report.problems.append(f"shard {k:08d}: metadata cannot be read: {e}")
                t = None
            if t is not None:
                uids, keys, statuses = t["uid"].to_pylist(), t["key"].to_pylist(), t["status"].to_pylist()
                all_uids += uids
                report.metadata_rows += t.num_rows
                report.status_counts.update(statuses)
                if len(set(keys)) != len(keys):
                    dup = [k_ for k_, c in Counter(keys).items() if c > 1]
                    report.problems.append(f"shard {k:08d}: duplicate keys in metadata: {_examples(dup)}")
                if set(t["shard"].to_pylist()) - {k}:
                    report.problems.append(f"shard {k:08d}: metadata rows name another shard")
                for u, key, st in zip(uids, keys, statuses):
                    if st == "success":
                        success[key] = u
                successes[k] = statuses.count("success")
        report.success_rows += len(success)
        samples = _scan_tar(tar_path, report, k) if tar_path.exists() else {}
        report.tar_samples += len(samples)
        for key, u in success.items():
            s = samples.get(key)
            if s is None:
                report.missing_samples.append(f"{k:08d}/{key}")
            elif not set(REQUIRED_EXTS) <= s["exts"]:
                report.missing_samples.append(f"{k:08d}/{key} (has {'/'.join(sorted(s['exts']))})")
            elif s["uid"] != u:
                report.uid_mismatch.append(f"{k:08d}/{key}")
        for key in samples.keys() - success.keys():
            report.orphan_samples.append(f"{k:08d}/{key}")

    # files the layout does not expect (e.g. shard numbers beyond the pool's count)
    for sub, suffix in (("shards", ".tar"), ("metadata", ".parquet")):
        d = pool / sub
        if d.is_dir():
            for p in sorted(d.iterdir()):
                if p.name.startswith(".tmp-") or (sub == "shards" and p.name == SIZES_FILE):
                    continue
                stem = p.name[: -len(suffix)] if p.name.endswith(suffix) else None
                if stem is None or not stem.isdigit() or len(stem) != 8 or int(stem) >= n_shards:
                    report.problems.append(f"{sub}/{p.name}: not a shard of this pool ({n_shards} shards)")

    _check_sizes_table(report, pool_meta, successes)
    if report.missing_samples:
        report.problems.append(f"{len(report.missing_samples)} success row(s) without a complete sample in their tar: "
                               f"{_examples(report.missing_samples)}")
    if report.orphan_samples:
        report.problems.append(f"{len(report.orphan_samples)} tar sample(s) without a success row: "
                               f"{_examples(report.orphan_samples)}")
    if report.uid_mismatch:
        report.problems.append(f"{len(report.uid_mismatch)} sample json uid(s) differ from the metadata: "
                               f"{_examples(report.uid_mismatch)}")
    if expected_uids is not None:
        report.expected_rows = len(expected_uids)
        want, have = Counter(expected_uids), Counter(all_uids)
        if want != have:
            lost = list((want - have).elements())
            extra = list((have - want).elements())
            report.problems.append(f"metadata uids differ from the input: {len(lost)} input row(s) missing "
                                   f"({_examples(lost)}), {len(extra)} unexpected ({_examples(extra)})")
    else:
        if report.expected_rows is not None and report.expected_rows != report.metadata_rows:
            report.problems.append(f"metadata has {report.metadata_rows} rows, the input had {report.expected_rows}")
        digest = pool_meta.get("input", {}).get("uid_multiset_sha256")
        if digest and report.expected_rows == report.metadata_rows and uid_digest(all_uids) != digest:
            report.problems.append("metadata uids differ from the input's (uid multiset digest in pool.json)")
    return report


@click.command("verify")
@click.argument("pool", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
def verify_cmd(pool: Path, as_json: bool) -> None:
    """Check that a downloaded pool is whole: metadata rows = input rows (uid multiset), every success row
    has its sample in its tar, no tar sample lacks a row, shards/sizes.json (the shard table DataComp's
    resharder reads) matches the metadata. Prints the reconciliation; exits 1 if it fails (a missing
    sizes.json is only a warning)."""
    report = verify_pool(pool, progress=sys.stderr.isatty())
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.table())
    if not report.ok:
        sys.exit(1)
