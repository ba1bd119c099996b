"""The offline CommonPool builder: counts, truth, served bytes, held-out splits, determinism, bad input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from curate.cli import main
from curate.core.errors import CurateError
from curate.pool.offline.build import OfflinePoolConfig, build_offline
from curate.pool.offline.evalsplits import TASKS
from curate.pool.offline.noise import DUP_KINDS, MODIFY_KINDS, NoiseConfig, Row, inject
from curate.pool.offline.sources import RenderJob, SourcePaths, read_twemoji, run_render_job
from curate.core.uids import is_uid, make_uid


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def truth(offline_pool_small) -> pd.DataFrame:
    return pd.read_parquet(offline_pool_small.truth)


def test_tables_reconcile_and_load_everywhere(offline_pool_small, truth):
    pool = offline_pool_small
    urls = pd.read_parquet(pool.urls)
    assert list(urls.columns) == ["url", "text"]
    assert 1300 <= len(urls) <= 1900, len(urls)
    assert list(urls.url) == list(truth.url) and list(urls.text) == list(truth.text)
    assert urls.url.is_unique
    assert all(u.startswith(pool.base_url + "/") for u in urls.url)
    assert all(is_uid(u) for u in truth.uid) and truth.uid.is_unique
    assert all(make_uid(u, t) == uid for u, t, uid in zip(truth.url, truth.text, truth.uid))
    n = duckdb.sql(f"select count(*) as n from read_parquet('{pool.truth}')").to_arrow_table()["n"][0].as_py()
    assert n == len(truth) == pool.summary["rows"]
    meta = json.loads((pool.path / "pool_build.json").read_text())
    assert meta["base_url"] == pool.base_url and meta["size"] == "small" and meta["seed"] == 0
    assert meta["counts"]["by_noise"] == dict(Counter(truth.noise))
    assert set(truth.source) == {"openclipart", "tuxpaint", "twemoji"}


def test_noise_counts_match_the_config(offline_pool_small, truth):
    base = truth[truth.noise.isin(("none",) + MODIFY_KINDS)]
    n_tux = int((base.source == "tuxpaint").sum())  # every Tux Paint stamp in the pool has translations
    planned = NoiseConfig().planned(len(base), n_tux)
    got = Counter(truth.noise)
    assert {k: got.get(k, 0) for k in planned} == planned
    assert planned["caption_swap"] == round(0.20 * len(base)) > 0
    assert got["none"] == len(base) - sum(planned[k] for k in MODIFY_KINDS)


def test_noise_rows_mean_what_they_say(truth):
    t = truth.set_index("uid", drop=False)
    swapped = truth[truth.noise == "caption_swap"]
    assert (swapped.text != swapped.original_text).mean() > 0.9  # a few real captions repeat ("gramastar")
    assert (truth[truth.noise == "empty_caption"].text == "").all()
    ne = truth[truth.noise == "non_english"]
    assert (ne.source == "tuxpaint").all() and (ne.text != ne.original_text).all()
    assert truth[truth.noise == "redirect"].url.str.contains("/_redirect/").all()
    clean = truth[truth.noise == "none"]
    assert (clean.text == clean.original_text).all()
    dups = truth[truth.noise.isin(DUP_KINDS)]
    assert dups.duplicate_of.notna().all() and truth[~truth.noise.isin(DUP_KINDS)].duplicate_of.isna().all()
    for _, r in dups.iterrows():
        orig = t.loc[r.duplicate_of]
        assert orig.noise == "none" and orig.source_id == r.source_id
        assert (r.sha256 == orig.sha256) == (r.noise == "exact_dup")
    ok = truth[truth.expected_status == "success"]
    assert (ok.width.notna() & ok.height.notna()).all()
    long_side = ok[["width", "height"]].max(axis=1)
    assert (long_side < 200).mean() > 0.05 and (long_side >= 256).mean() > 0.5  # sizes vary on purpose


def _fetch(url: str):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def _decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Image.DecompressionBombError:
        raise
    except Exception:
        return False


def test_every_url_gives_the_intended_bytes_or_error(offline_pool_small, truth):
    rows = list(truth.itertuples())
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda r: _fetch(r.url), rows))
    seen = Counter()
    for r, (status, body) in zip(rows, results):
        seen[r.expected_status] += 1
        where = f"{r.url} ({r.noise})"
        if r.expected_status == "404":
            assert status == 404, where
            continue
        assert status == 200, where
        assert sha(body) == r.sha256 == sha((offline_pool_small.path / r.file).read_bytes()), where
        if r.expected_status == "success":
            assert _decodes(body), where
        elif r.expected_status in ("truncated", "not_image"):
            assert not _decodes(body), where
        elif r.expected_status == "bomb":
            with pytest.raises(Image.DecompressionBombError):  # PIL's own check, on the header alone
                Image.open(io.BytesIO(body))
        elif r.expected_status == "oversized":
            assert len(body) > 3_000_000 and _decodes(body), where
    assert set(seen) == {"success", "404", "truncated", "not_image", "bomb", "oversized"}


def test_bombs_declare_huge_pixel_counts(offline_pool_small, truth):
    for f in truth[truth.expected_status == "bomb"].file:
        data = (offline_pool_small.path / f).read_bytes()
        assert len(data) < 100_000
        with pytest.raises(Image.DecompressionBombError):
            Image.open(io.BytesIO(data))


def test_heldout_splits_never_enter_the_pool(offline_pool_small, truth):
    pool = offline_pool_small.path
    served = {sha(p.read_bytes()) for p in (pool / "www").rglob("*") if p.is_file()}
    pool_ids = set(zip(truth.source, truth.source_id))
    source_of = {"emoji_category": "twemoji", "flags_country": "twemoji", "tuxpaint_retrieval": "tuxpaint"}
    for task in TASKS:
        folder = pool / "evalsets" / task
        index = pd.read_parquet(folder / "index.parquet")
        classnames = (folder / "classnames.txt").read_text(encoding="utf-8").splitlines()
        assert len(index) > 10, task
        assert index.label.between(0, len(classnames) - 1).all()
        assert (index.classname == [classnames[k] for k in index.label]).all()
        for _, r in index.iterrows():
            data = (folder / r.image).read_bytes()
            assert sha(data) == r.sha256 and _decodes(data)
            assert r.sha256 not in served, f"{task}: {r.source_id} is also served in the pool"
            assert (source_of[task], r.source_id) not in pool_ids, f"{task}: {r.source_id} in the pool"
    # skin-tone variants go with their base emoji: no pool emoji shares a group with a held-out one
    group_of = {e.source_id: e.group for e in read_twemoji(SourcePaths().resolved().twemoji)}
    held = set(pd.read_parquet(pool / "evalsets/emoji_category/index.parquet").source_id)
    held_groups = {group_of[s] for s in held}
    assert any(group_of[s] != s for s in held)  # the split does contain variants
    leaked = [s for s in truth[truth.source == "twemoji"].source_id if group_of[s] in held_groups]
    assert not leaked


def test_same_seed_same_bytes_and_overwrite(offline_pool_small, tmp_path):
    again = tmp_path / "again"
    again.mkdir()
    (again / "junk.txt").write_text("replace me")
    killed = tmp_path / ".tmp-build-again-killed"  # what a build killed half-way leaves behind
    (killed / "www").mkdir(parents=True)
    build_offline(OfflinePoolConfig(out=again, seed=0, size="small", base_url=offline_pool_small.base_url,
                                    overwrite=True, progress=False))
    assert not (again / "junk.txt").exists()

    def digests(root: Path) -> dict[str, str]:
        return {p.relative_to(root).as_posix(): sha(p.read_bytes())
                for p in sorted(root.rglob("*")) if p.is_file() and p.name != "pool_build.json"}

    a, b = digests(offline_pool_small.path), digests(again)
    assert len(a) > 1000 and a == b
    ja, jb = (json.loads((d / "pool_build.json").read_text()) for d in (offline_pool_small.path, again))
    for j in (ja, jb):  # run statistics may differ (cache hits, seconds); everything else may not
        j.pop("timings"), j.pop("render")
    assert ja == jb
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # nothing half-written left


def test_rerun_is_up_to_date_and_does_nothing(offline_pool_small):
    before = (offline_pool_small.path / "urls.parquet").stat().st_mtime_ns
    r = CliRunner().invoke(main, ["pool", "build-offline", "--out", str(offline_pool_small.path), "--size", "small",
                                  "--base-url", offline_pool_small.base_url])
    assert r.exit_code == 0, r.output
    assert "already up to date" in r.output
    assert (offline_pool_small.path / "urls.parquet").stat().st_mtime_ns == before


def test_non_empty_out_dir_is_a_clear_error(tmp_path):
    out = tmp_path / "pool"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = CliRunner().invoke(main, ["pool", "build-offline", "--out", str(out), "--size", "small"])
    assert r.exit_code == 2
    assert "not empty" in r.output and "--overwrite" in r.output and str(out) in r.output
    assert "Traceback" not in r.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_dir_is_a_clear_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(CurateError, match="not writable"):
            build_offline(OfflinePoolConfig(out=locked / "pool", size="small"))
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("option, package", [
    ("--twemoji-dir", "emoji-datasource-twitter"),
    ("--tuxpaint-dir", "tuxpaint-stamps-default"),
    ("--openclipart-dir", "openclipart-svg"),
])
def test_missing_source_names_the_package(tmp_path, option, package):
    r = CliRunner().invoke(main, ["pool", "build-offline", "--out", str(tmp_path / "p"), "--size", "small",
                                  option, str(tmp_path / "nowhere")])
    assert r.exit_code == 2, r.output
    assert package in r.output and "make setup" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "p").exists()


def test_bad_base_url_is_rejected(tmp_path):
    with pytest.raises(CurateError, match="base-url"):
        build_offline(OfflinePoolConfig(out=tmp_path / "p", base_url="file:///etc"))


def _fake_rows(tmp_path: Path, n: int) -> tuple[list[Row], callable, callable]:
    www = tmp_path / "www"
    (www / "s").mkdir(parents=True)
    rows = []
    for i in range(n):
        im = Image.new("RGB", (40 + i % 7, 30), (i % 256, 80, 160))
        buf = io.BytesIO()
        im.save(buf, "PNG")
        (www / f"s/{i}.png").write_bytes(buf.getvalue())
        src = "tuxpaint" if i % 5 == 0 else "openclipart"
        rows.append(Row(src, f"id{i}", f"caption {i}", f"caption {i}", f"s/{i}.png", f"s/{i}.png",
                        translations={"fr": f"légende {i}"} if src == "tuxpaint" else {}))

    def read(rel):
        return (www / rel).read_bytes()

    def write(rel, data):
        (www / rel).parent.mkdir(parents=True, exist_ok=True)
        (www / rel).write_bytes(data)

    return rows, read, write


def test_inject_is_seeded_and_exact(tmp_path):
    cfg = NoiseConfig(oversized_bytes=30_000)
    out = {}
    for seed in (1, 1, 2):
        rows, read, write = _fake_rows(tmp_path / f"s{seed}{len(out)}", 300)
        res = inject(rows, cfg, seed, read, write)
        out.setdefault(seed, []).append([(r.text, r.url_path, r.noise, r.duplicate_of) for r in res])
        got = Counter(r.noise for r in res)
        assert got.pop("none") == 300 - sum(got[k] for k in MODIFY_KINDS)
        assert got == {k: v for k, v in cfg.planned(300, 60).items() if v}
    assert out[1][0] == out[1][1]
    assert out[1][0] != out[2][0]


def test_render_limits_skip_pathological_files(tmp_path):
    big = tmp_path / "big.svg"
    big.write_bytes(b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'>" + b" " * 5000 + b"</svg>")
    status, _, reason = run_render_job(RenderJob(str(big), 64, "png", str(tmp_path / "c1.png"), 1000, 10**6, 5))
    assert status == "skipped" and "limit" in reason and (tmp_path / "c1.png.fail").exists()
    slow = tmp_path / "slow.svg"  # many paths: takes far longer than a 1 ms budget
    paths = "".join(f"<circle cx='{random.Random(i).random() * 100}' cy='{i % 100}' r='3'/>" for i in range(20000))
    slow.write_text(f"<svg xmlns='http://www.w3.org/2000/svg' width='100' height='100'>{paths}</svg>")
    status, _, reason = run_render_job(RenderJob(str(slow), 64, "png", str(tmp_path / "c2.png"), 10**8, 10**6, 0.001))
    assert status == "skipped" and "longer than" in reason
    xxe = tmp_path / "xxe.svg"
    xxe.write_text("<?xml version='1.0'?><!DOCTYPE svg [<!ENTITY x SYSTEM 'file:///etc/passwd'>]>"
                   "<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'><text>&x;</text></svg>")
    status, _, reason = run_render_job(RenderJob(str(xxe), 64, "png", str(tmp_path / "c3.png"), 10**8, 10**6, 5))
    assert status == "skipped"
    ok = tmp_path / "ok.svg"
    ok.write_text("<svg xmlns='http://www.w3.org/2000/svg' width='20' height='10'><rect width='20' height='10'/></svg>")
    status, _, _ = run_render_job(RenderJob(str(ok), 64, "jpeg", str(tmp_path / "c4.jpeg"), 10**8, 10**6, 5))
    assert status == "ok"
    with Image.open(tmp_path / "c4.jpeg") as im:
        assert im.format == "JPEG" and im.size == (64, 32)
