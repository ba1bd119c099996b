"""`curate submit` / `curate verify`: bundles hold what they claim, tampering is caught and named, tar is safe."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from benchmark import submit as sub
from curate.core import uids as uidlib
from curate.cli import main
from curate.core.errors import CurateError
from tests.pool_factory import make_pool
from tests.run_factory import make_run, make_subset


@pytest.fixture
def setup(tmp_path):
    fp = make_pool(tmp_path / "pool", n_shards=2, per_shard=12, corrupt=1, failed=2)
    ok = fp.success_uids()
    subset = make_subset(tmp_path / "subset", ok[:10] + ok[:2])  # duplicates = upsampling, still valid
    run = make_run(tmp_path / "run", subset, seed=3)
    return fp, subset, run


def _rehash(bundle: Path) -> None:
    """What a careful cheater does after editing files: update every declared hash so only semantics can catch it."""
    decl = json.loads((bundle / "bundle.json").read_text())
    for f in decl["files"]:
        decl["files"][f] = hashlib.sha256((bundle / f).read_bytes()).hexdigest()
    sha = decl["files"]["uids.npy"]
    (bundle / "uids.npy.sha256").write_text(f"{sha}  uids.npy\n")
    decl["files"]["uids.npy.sha256"] = hashlib.sha256((bundle / "uids.npy.sha256").read_bytes()).hexdigest()
    decl["uids_sha256"] = sha
    (bundle / "bundle.json").write_text(json.dumps(decl))


def test_submit_writes_complete_bundle(setup, tmp_path):
    fp, subset, run = setup
    s = sub.submit(sub.SubmitConfig(run=run))
    b = Path(s["bundle"])
    assert b == run / "submission"
    for f in ("results.jsonl", "uids.npy", "uids.npy.sha256", "recipe.yaml", "manifest.json", "info.json",
              "versions.json", "bundle.json"):
        assert (b / f).is_file(), f
    decl = json.loads((b / "bundle.json").read_text())
    assert decl["name"] == "my_recipe"  # from the recipe
    assert decl["subset_size"] == 12 and decl["unique_uids"] == 10
    assert decl["seed"] == 3 and decl["scale"] == "debug"
    assert decl["uids_sha256"] == hashlib.sha256((subset / "uids.npy").read_bytes()).hexdigest()
    assert decl["average"] == pytest.approx(np.mean([0.3, 0.1, 0.2]))
    # results.jsonl is DataComp's eval_results format, one line per task
    lines = [json.loads(l) for l in (b / "results.jsonl").read_text().splitlines()]
    assert sorted(l["key"] for l in lines) == decl["tasks"]
    assert all({"key", "dataset", "main_metric", "metrics"} <= set(l) for l in lines)
    # the uid file is plain DataComp format
    arr = np.load(b / "uids.npy")
    assert arr.dtype == np.dtype("u8,u8") and len(arr) == 12
    # the tarball holds the same files under one folder
    with tarfile.open(s["tarball"]) as tar:
        names = sorted(tar.getnames())
    assert names == sorted(f"submission/{p.name}" for p in b.iterdir())


def test_resubmit_is_noop_and_tarball_reproducible(setup):
    _, _, run = setup
    s1 = sub.submit(sub.SubmitConfig(run=run))
    tar1 = Path(s1["tarball"]).read_bytes()
    mtime = (run / "submission" / "uids.npy").stat().st_mtime_ns
    s2 = sub.submit(sub.SubmitConfig(run=run))
    assert s2["unchanged"] and not s1["unchanged"]
    assert (run / "submission" / "uids.npy").stat().st_mtime_ns == mtime
    assert Path(s2["tarball"]).read_bytes() == tar1


def test_missing_average_tasks_are_reported_not_zero(setup, tmp_path):
    _, subset, _ = setup
    run = make_run(tmp_path / "run2", subset, scores={"a": 0.5, "b": None, "c": 0.25})
    s = sub.submit(sub.SubmitConfig(run=run, name="x"))
    assert s["average"] == pytest.approx(0.375)
    assert s["tasks_missing"] == ["b"]


def test_verify_ok_for_dir_and_tarball(setup):
    fp, _, run = setup
    s = sub.submit(sub.SubmitConfig(run=run))
    for target in (s["bundle"], s["tarball"]):
        rep = sub.verify(sub.VerifyConfig(bundle=Path(target), pool=fp.pool))
        assert rep.ok, rep.reasons
        assert {"uids in pool", "declared size", "file hashes", "task coverage", "average"} <= {c[0] for c in rep.checks}


def _tamper_foreign_uid(b: Path) -> None:
    arr = uidlib.load(b / "uids.npy")
    extra = uidlib.encode(["f" * 32])
    uidlib.save(b / "uids.npy", np.concatenate([arr, extra]))
    decl = json.loads((b / "bundle.json").read_text())
    decl["subset_size"] += 1
    (b / "bundle.json").write_text(json.dumps(decl))
    _rehash(b)


def _tamper_size(b: Path) -> None:
    decl = json.loads((b / "bundle.json").read_text())
    decl["subset_size"] = 1_000_000
    (b / "bundle.json").write_text(json.dumps(decl))


def _tamper_score(b: Path) -> None:
    lines = [json.loads(l) for l in (b / "results.jsonl").read_text().splitlines()]
    lines[0]["metrics"][lines[0]["main_metric"]] = 0.99
    (b / "results.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))


def _tamper_score_rehash(b: Path) -> None:
    _tamper_score(b)
    _rehash(b)  # hashes now agree, but the declared average no longer matches the results


def _tamper_drop_task(b: Path) -> None:
    lines = (b / "results.jsonl").read_text().splitlines()
    (b / "results.jsonl").write_text("\n".join(lines[1:]) + "\n")
    _rehash(b)


def _tamper_unofficial(b: Path) -> None:
    info = json.loads((b / "info.json").read_text())
    info["official"] = False
    (b / "info.json").write_text(json.dumps(info))
    _rehash(b)


def _tamper_uids_sidecar(b: Path) -> None:
    (b / "uids.npy.sha256").write_text("0" * 64 + "  uids.npy\n")


@pytest.mark.parametrize("tamper, check", [
    (_tamper_foreign_uid, "uids in pool"),
    (_tamper_size, "declared size"),
    (_tamper_score, "file hashes"),
    (_tamper_score_rehash, "average"),
    (_tamper_drop_task, "task coverage"),
    (_tamper_unofficial, "official hyperparameters"),
    (_tamper_uids_sidecar, "uids sha256"),
])
def test_tampered_bundle_fails_with_reason(setup, tamper, check):
    fp, _, run = setup
    b = Path(sub.submit(sub.SubmitConfig(run=run, tarball=False))["bundle"])
    tamper(b)
    rep = sub.verify(sub.VerifyConfig(bundle=b, pool=fp.pool))
    assert not rep.ok
    failed = {c for c, passed, _ in rep.checks if not passed}
    assert check in failed, rep.reasons


def test_hyperparameters_compared_to_official_scale(setup):
    fp, subset, run = setup  # the run records benchmark/scales.py's `debug` values: lr 1e-3
    b = Path(sub.submit(sub.SubmitConfig(run=run, tarball=False))["bundle"])
    assert sub.verify(sub.VerifyConfig(bundle=b, pool=fp.pool)).ok
    info = json.loads((b / "info.json").read_text())
    info["run"]["scale"]["lr"] = 5e-3
    (b / "info.json").write_text(json.dumps(info))
    _rehash(b)
    rep = sub.verify(sub.VerifyConfig(bundle=b, pool=fp.pool))
    assert not rep.ok
    assert any("lr=0.005" in r and "official 0.001" in r for r in rep.reasons), rep.reasons


def test_failed_download_uids_warn_or_fail(setup, tmp_path):
    fp, _, _ = setup
    subset = make_subset(tmp_path / "s2", fp.success_uids()[:5] + fp.failed_uids[:1])
    run = make_run(tmp_path / "r2", subset)
    b = Path(sub.submit(sub.SubmitConfig(run=run, tarball=False))["bundle"])
    assert sub.verify(sub.VerifyConfig(bundle=b, pool=fp.pool)).ok
    rep = sub.verify(sub.VerifyConfig(bundle=b, pool=fp.pool, require_success=True))
    assert not rep.ok and any("did not download" in r for r in rep.reasons)


def _tar_with(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    p = tmp_path / "evil.tar.gz"
    with tarfile.open(p, "w:gz") as tar:
        if member.isfile():
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        else:
            tar.addfile(member)
    return p


@pytest.mark.parametrize("name, kind", [("../escaped.txt", "file"), ("/tmp/abs.txt", "file"),
                                        ("b/link", "symlink"), ("b/hard", "hardlink")])
def test_safe_extract_refuses_traversal_and_links(tmp_path, name, kind):
    ti = tarfile.TarInfo(name)
    if kind == "symlink":
        ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        ti.type, ti.linkname = tarfile.LNKTYPE, "../../outside"
    p = _tar_with(tmp_path, ti)
    dest = tmp_path / "x"
    dest.mkdir()
    with pytest.raises(CurateError, match="refusing to extract"):
        sub.verify(sub.VerifyConfig(bundle=p, pool=tmp_path))
    with pytest.raises(CurateError, match=name.split("/")[-1]):
        sub.safe_extract(p, dest)
    assert not (tmp_path / "escaped.txt").exists() and list(dest.iterdir()) == []


def test_submit_errors_name_the_missing_file(setup, tmp_path):
    _, subset, run = setup
    (run / "eval_results.jsonl").unlink()
    with pytest.raises(CurateError, match="eval_results.jsonl"):
        sub.submit(sub.SubmitConfig(run=run))
    (run / "eval_results.jsonl").write_text('{"key": "a", "main_metric": "acc1", "metrics": {"acc1": "high"}}\n')
    with pytest.raises(CurateError, match="line 1 .*acc1.*not a finite number"):
        sub.submit(sub.SubmitConfig(run=run))


def test_cli_submit_and_verify(setup, tmp_path):
    fp, _, run = setup
    db = tmp_path / "lb.duckdb"
    r = CliRunner().invoke(main, ["submit", str(run), "--name", "mine", "--db", str(db)])
    assert r.exit_code == 0, r.output
    assert "name=mine" in r.output and db.is_file()
    tarball = run / "submission.tar.gz"
    r = CliRunner().invoke(main, ["verify", str(tarball), "--pool", str(fp.pool)])
    assert r.exit_code == 0, r.output
    assert "VERIFIED" in r.output
    _tamper_size(run / "submission")
    r = CliRunner().invoke(main, ["verify", str(run / "submission"), "--pool", str(fp.pool)])
    assert r.exit_code == 1
    assert "declared size" in r.output and "1000000" in r.output
