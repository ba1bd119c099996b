"""The recipe runner end to end: outputs, ledger semantics, exact pool-wide fractions, caching, diff, report."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from curate.core import uids as U
from curate.cli import main
from curate.core.errors import CurateError
from curate.filter.engine import FilterConfig, filter_pool
from tests.metadata_factory import write_embeddings, write_metadata

MODEL = "curate-debug__0123456789ab"


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("fpool") / "pool"
    write_metadata(p, n_rows=6000, n_files=12, seed=3)
    write_embeddings(p, MODEL, dim=16, seed=4)
    return p


def _recipe(tmp_path: Path, body: str, name: str = "r") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(body))
    return str(path)


BASIC_CLIP = """\
    name: basic_clip
    steps:
      - basic: {}
      - clip_score: {model: curate-debug, keep_top_fraction: 0.3}
    """


def _run(tmp_path, pool, body=BASIC_CLIP, out="out", **kw):
    return filter_pool(FilterConfig(recipe=_recipe(tmp_path, body), pool=str(pool), out=str(tmp_path / out),
                                    progress=False, **kw))


def _meta(pool: Path) -> pa.Table:
    return pq.read_table(pool / "metadata")


def test_outputs_reconcile_and_load_everywhere(tmp_path, pool):
    s = _run(tmp_path, pool, workers=1)
    out = tmp_path / "out"
    meta = _meta(pool)
    n_pool = meta.num_rows
    n_ok = pc.sum(pc.equal(meta["status"], "success")).as_py()
    assert s["pool_rows"] == n_pool and s["candidates"] == n_ok
    steps = s["steps"]
    assert [x["step"] for x in steps] == ["pool", "0.basic", "1.clip_score"]
    for prev, cur in zip(steps, steps[1:]):
        assert cur["in"] == prev["kept"] and cur["kept"] + cur["dropped"] == cur["in"]
    assert steps[2]["kept"] == int(np.floor(steps[1]["kept"] * 0.3)) == s["kept"]

    # subset.parquet loads in pandas, polars, duckdb and pyarrow with the same rows
    import duckdb
    import pandas as pd
    import polars as pl

    df = pd.read_parquet(out / "subset.parquet")
    assert len(df) == s["kept"] and list(df.columns[:5]) == ["uid", "url", "text", "shard", "key"]
    assert "clip_score" in df.columns and df.uid.is_monotonic_increasing
    assert pl.read_parquet(out / "subset.parquet").height == s["kept"]
    assert duckdb.sql(f"SELECT count(*) FROM '{out / 'subset.parquet'}'").fetchall()[0][0] == s["kept"]
    assert pq.read_table(out / "subset.parquet").num_rows == s["kept"]

    # uids.npy is DataComp's format and holds exactly the subset's uids
    arr = U.load(out / "uids.npy")
    assert arr.dtype == np.dtype("u8,u8") and sorted(U.decode(arr)) == sorted(df.uid)

    # ledger: every pool uid once at step 'pool'; every uid reaching a step exactly once there
    led = pd.read_parquet(out / "decisions.parquet")
    assert set(led.columns) >= {"uid", "step", "kept", "score", "threshold", "reason"}
    assert (led.groupby(["uid", "step"]).size() == 1).all()
    pool_rows = led[led.step == "pool"]
    assert len(pool_rows) == n_pool and set(pool_rows.uid) == set(meta["uid"].to_pylist())
    failed = pool_rows[~pool_rows.kept]
    assert set(failed.reason) <= {"failed_to_download", "failed_to_resize"} and len(failed) == n_pool - n_ok
    basic = led[led.step == "0.basic"]
    assert set(basic.uid) == set(pool_rows.uid[pool_rows.kept])
    clip = led[led.step == "1.clip_score"]
    assert set(clip.uid) == set(basic.uid[basic.kept])
    assert set(clip.uid[clip.kept]) == set(df.uid)
    assert basic.reason[~basic.kept].notna().all() and basic.reason[basic.kept].isna().all()
    # threshold recorded = the lowest kept score
    assert clip.threshold.iloc[0] == pytest.approx(clip.score[clip.kept].min())

    man = json.loads((out / "manifest.json").read_text())
    assert man["recipe_hash"] and man["model_ids"] == [MODEL] and man["counts"]["subset"] == s["kept"]
    assert {"duckdb", "pyarrow"} <= set(man["versions"]) and len(man["inputs"]["metadata"]) == 12
    html = (out / "report.html").read_text()
    assert "Funnel" in html and "1.clip_score" in html and html.count("data:image/png;base64,") == 2  # funnel + clip hist
    assert "no image in shards" in html  # this pool has no tars: placeholders, not a crash


def test_keep_top_fraction_is_exact_across_shards(tmp_path, pool):
    s = _run(tmp_path, pool, "name: top\nsteps:\n  - clip_score: {model: curate-debug, keep_top_fraction: 0.37}\n")
    emb = pq.read_table(pool / "embeddings" / MODEL, columns=["uid", "clip_score"])
    # reference over all 12 files at once: sort by score desc, uid asc; take floor(N * 0.37)
    uids = np.array(emb["uid"].to_pylist())
    score = emb["clip_score"].to_numpy()
    order = np.lexsort((uids, -score))
    k = int(np.floor(len(uids) * 0.37))
    expected = sorted(uids[order[:k]])
    got = pq.read_table(tmp_path / "out" / "subset.parquet")["uid"].to_pylist()
    assert got == expected and s["kept"] == k


def test_rerun_is_a_no_op_and_changed_step_recomputes_from_there(tmp_path, pool):
    _run(tmp_path, pool, workers=1)
    out = tmp_path / "out"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    r = CliRunner().invoke(main, ["filter", "--recipe", str(tmp_path / "r.yaml"), "--pool", str(pool), "--out", str(out)])
    assert r.exit_code == 0 and "already up to date" in r.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == before
    # change the second step only: basic comes from the cache, clip_score recomputes
    s = _run(tmp_path, pool, BASIC_CLIP.replace("0.3", "0.5"), workers=1)
    assert [x["cached"] for x in s["steps"]] == [True, True, False]
    assert s["steps"][2]["kept"] == int(np.floor(s["steps"][1]["kept"] * 0.5))
    # a new input file invalidates everything
    extra = pool.parent / "pool2"
    import shutil

    shutil.copytree(pool, extra)
    write_metadata(extra, n_rows=10, n_files=1, seed=99)  # rewrites 00000000.parquet
    s = _run(tmp_path, extra, BASIC_CLIP.replace("0.3", "0.5"), workers=1)
    assert not any(x["cached"] for x in s["steps"])


def test_resume_after_a_kill_reuses_finished_steps(tmp_path, pool):
    _run(tmp_path, pool, workers=1)
    out = tmp_path / "out"
    # simulate a kill during the final writes: outputs half there, a temp file left behind
    (out / "manifest.json").unlink()
    (out / "subset.parquet").unlink()
    (out / ".tmp-subset.parquet.abc.parquet").write_bytes(b"partial")
    s = _run(tmp_path, pool, workers=1)
    assert [x["cached"] for x in s["steps"]] == [True, True, True]
    assert not list(out.glob(".tmp-*")) and (out / "subset.parquet").exists()


def test_parallel_row_filters_match_single_process(tmp_path, pool):
    a = _run(tmp_path, pool, "name: b\nsteps:\n  - basic: {}\n", out="a", workers=1)
    b = _run(tmp_path, pool, "name: b\nsteps:\n  - basic: {}\n", out="b", workers=2, batch_rows=500)
    assert a["kept"] == b["kept"]
    ua = pq.read_table(tmp_path / "a" / "subset.parquet")["uid"]
    ub = pq.read_table(tmp_path / "b" / "subset.parquet")["uid"]
    assert ua.equals(ub)


def test_intersect_and_union_match_separate_runs(tmp_path, pool):
    one = "name: one\nsteps:\n  - basic: {}\n"
    two = "name: two\nsteps:\n  - clip_score: {model: curate-debug, threshold: 0.6}\n"
    a = set(pq.read_table(Path(_run(tmp_path, pool, one, out="a", workers=1)["out"]) / "subset.parquet")["uid"].to_pylist())
    b = set(pq.read_table(Path(_run(tmp_path, pool, two, out="b")["out"]) / "subset.parquet")["uid"].to_pylist())
    for op, expect in (("intersect", a & b), ("union", a | b)):
        body = f"""\
            name: {op}
            steps:
              - {op}:
                  - [basic: {{}}]
                  - [clip_score: {{model: curate-debug, threshold: 0.6}}]
            """
        s = _run(tmp_path, pool, body, out=op, workers=1)
        got = pq.read_table(tmp_path / op / "subset.parquet")
        assert set(got["uid"].to_pylist()) == expect and s["kept"] == len(expect)
        assert "clip_score" in got.column_names
        led = pq.read_table(tmp_path / op / "decisions.parquet").to_pandas()
        assert set(led.step) == {"pool", f"0.{op}", "0.0.0.basic", "0.1.0.clip_score"}
        top = led[led.step == f"0.{op}"]
        assert len(top) == s["candidates"] and top.uid.is_unique
        assert top.reason[~top.kept].str.contains("branch").all()


def test_no_filter_keeps_every_downloaded_row(tmp_path, pool):
    s = _run(tmp_path, pool, "name: nf\nsteps: []\n")
    assert s["kept"] == s["candidates"] and s["steps"][0]["step"] == "pool"


def test_diff_names_the_deciding_step(tmp_path, pool):
    _run(tmp_path, pool, out="a", workers=1)
    _run(tmp_path, pool, "name: b\nsteps:\n  - basic: {}\n", out="b", workers=1)
    from curate.filter.diff import DiffConfig, diff_subsets

    r = diff_subsets(DiffConfig(str(tmp_path / "a"), str(tmp_path / "b"), out=str(tmp_path / "d.parquet")))
    na = pq.read_metadata(tmp_path / "a" / "subset.parquet").num_rows
    nb = pq.read_metadata(tmp_path / "b" / "subset.parquet").num_rows
    assert (r["in_a"], r["in_b"], r["both"], r["only_a"], r["only_b"]) == (na, nb, na, 0, nb - na)
    assert r["neither"] == r["universe"] - nb and r["same_pool"]
    assert r["by_step"] == [{"dropped_in": "A", "step": "1.clip_score", "count": nb - na}]
    d = pq.read_table(tmp_path / "d.parquet").to_pandas()
    assert len(d) == nb - na and d.reason.str.startswith("not in top 0.3").all()
    res = CliRunner().invoke(main, ["diff", str(tmp_path / "a"), str(tmp_path / "b")])
    assert res.exit_code == 0 and f"only B {nb - na}" in res.output and "1.clip_score" in res.output


def test_clear_errors(tmp_path, pool):
    with pytest.raises(CurateError, match="not a pool"):
        _run(tmp_path, tmp_path / "nowhere")
    with pytest.raises(CurateError, match="no pool given"):
        filter_pool(FilterConfig(recipe=_recipe(tmp_path, "name: x\nsteps: []\n")))
    r = CliRunner().invoke(main, ["filter", "--recipe", _recipe(tmp_path, "name: x\nsteps:\n  - basic: {min_side: -1}\n"),
                                  "--pool", str(pool)])
    assert r.exit_code == 2 and "r.yaml:3: steps[0].basic.min_side: -1 is below the minimum 0" in r.output
    assert "Traceback" not in r.output


def test_report_shows_thumbnails_from_shards(tmp_path):
    from tests.pool_factory import make_pool

    fp = make_pool(tmp_path / "p", n_shards=2, per_shard=12, corrupt=1, failed=2, image_size=64)
    s = _run(tmp_path, fp.pool, "name: nf\nsteps:\n  - basic: {min_words: 2, min_side: 0, english: false}\n")
    html = (tmp_path / "out" / "report.html").read_text()
    # kept and dropped thumbnails are real images from the tars (corrupt ones are skipped, not fatal)
    assert html.count("data:image/png;base64,") >= 3 and "Dropped samples" in html and "words &lt; 2" in html
    assert s["pool_rows"] == 24


def test_image_based_embeds_target_images_with_the_steps_model(tmp_path):
    """Target images go through the runner's embedder (curate.clip.models, local checkpoint) and land in their clusters."""
    from PIL import Image

    from curate.filter.engine import ImageEmbedder
    from curate.clip.models import load_model, model_id, save_checkpoint

    ckpt = tmp_path / "debug.pt"
    save_checkpoint(load_model("curate-debug", None, "cpu").model, ckpt)
    mid = model_id("curate-debug", str(ckpt))
    rng = np.random.default_rng(0)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    paths = []
    for i in range(40):
        base = np.array([255, 0, 0]) if i < 20 else np.array([0, 0, 255])
        arr = np.clip(base + rng.integers(-40, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
        paths.append(imgs / f"{i}.png")
        Image.fromarray(arr).save(paths[-1])
    emb = ImageEmbedder("curate-debug", str(ckpt), "cpu")([str(p) for p in paths])
    assert emb.shape == (40, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    pool = tmp_path / "pool"
    meta = write_metadata(pool, rows=[{"uid": f"{i:032x}", "text": "a red square on a table"} for i in range(40)])
    write_embeddings(pool, mid, dim=32, image_emb={u: emb[i] for i, u in enumerate(meta["uid"].to_pylist())})
    target = tmp_path / "target"
    target.mkdir()
    for i in (0, 1, 2):
        (target / f"{i}.png").write_bytes(paths[i].read_bytes())
    body = f"""\
        name: ib
        steps:
          - image_based: {{model: curate-debug, pretrained: {ckpt}, target: {target}, n_clusters: 4,
                          caption_filter: false}}
        """
    s = _run(tmp_path, pool, body)
    kept = set(pq.read_table(tmp_path / "out" / "subset.parquet")["uid"].to_pylist())
    assert {f"{i:032x}" for i in (0, 1, 2)} <= kept  # a target's own image is in a target cluster
    assert 3 <= s["kept"] < 40
    assert "image_based" in pq.read_schema(tmp_path / "out" / "subset.parquet").names


def test_ray_row_filters_match_local(tmp_path, pool):
    ray = pytest.importorskip("ray")
    try:
        a = _run(tmp_path, pool, "name: b\nsteps:\n  - basic: {}\n", out="a", workers=1)
        b = _run(tmp_path, pool, "name: b\nsteps:\n  - basic: {}\n", out="b", batch_rows=700, ray_address="local")
    finally:
        ray.shutdown()
    assert a["kept"] == b["kept"]
    assert pq.read_table(tmp_path / "a" / "decisions.parquet").sort_by([("step", "ascending"), ("uid", "ascending")]) \
        .equals(pq.read_table(tmp_path / "b" / "decisions.parquet").sort_by([("step", "ascending"), ("uid", "ascending")]))
