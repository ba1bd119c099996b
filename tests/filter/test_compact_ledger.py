"""The compact ledger of streamed runs on DataComp pools: same decisions as the general engine.

A streamed run (`--ledger compact`) decides file by file and writes ledger.parquet (per step the
dropped rows, kept rows implied) instead of decisions.parquet. Here both forms run on the same small
DataComp-format pool and must agree exactly: uids.npy bytes, subset rows, and the full ledger that
`curate ledger` expands from the compact one, row for row. One pool has scores rounded to two
decimals, so the top-30% cut falls inside a run of ties (the smallest uids at the cut are kept)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from curate.cli import main
from curate.core.errors import CurateError
from curate.filter import engine
from curate.filter.engine import FilterConfig, filter_pool
from curate.pool.datacomp import ImportConfig, import_datacomp
from tests.datacomp_factory import write_datacomp_pool

REPO = Path(__file__).resolve().parents[2]
LEDGER_COLS = ["uid", "step", "step_index", "kept", "score", "threshold", "reason"]
CLIP = (REPO / "recipes" / "clip_l14_30pct.yaml").read_text()
RECIPES = {
    "top": CLIP,
    "ties": CLIP.replace("0.3}", "0.3, datacomp_ties: true}"),
    "threshold": CLIP.replace("keep_top_fraction: 0.3}", "threshold: 0.28}"),
    "basic_clip": "name: bc\nsteps:\n  - basic: {min_side: 100}\n  - clip_score: {model: ViT-L-14, keep_top_fraction: 0.3}\n",
    "two_cuts": "name: tc\nsteps:\n  - clip_score: {model: ViT-B-32, keep_top_fraction: 0.5}\n"
                "  - clip_score: {model: ViT-L-14, keep_top_fraction: 0.5}\n",
}


def _pool(root: Path, rounded: bool) -> Path:
    src = root / "metadata"
    write_datacomp_pool(src, n_rows=3000, n_files=3, seed=7, dims={"b32": 4, "l14": 4})
    if rounded:  # many equal scores: the cut falls inside a run of ties
        for f in sorted(src.glob("*.parquet")):
            t = pq.read_table(f)
            col = "clip_l14_similarity_score"
            s = np.round(t[col].to_numpy().astype(np.float64), 2).astype(np.float32)
            s[::97] = np.nan  # and some rows without a score
            t = t.set_column(t.schema.get_field_index(col), col, pa.array(s, pa.float32(), from_pandas=False))
            pq.write_table(t, f)
    import_datacomp(ImportConfig(metadata_dir=src, out=root / "pool"))
    return root / "pool"


@pytest.fixture(scope="module", params=[False, True], ids=["scores", "tied_scores"])
def pool(request, tmp_path_factory) -> Path:
    return _pool(tmp_path_factory.mktemp("cl"), request.param)


def _run(pool: Path, out: Path, text: str, ledger: str, **kw) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    recipe = out.parent / f"{out.name}.yaml"
    recipe.write_text(text)
    return filter_pool(FilterConfig(recipe=str(recipe), pool=str(pool), out=str(out), report=False, progress=False,
                                    ledger=ledger, workers=1, **kw))


def _sorted(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return df.sort_values(keys).reset_index(drop=True)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_compact_ledger_expands_to_the_full_ledger(pool, tmp_path, name):
    full = _run(pool, tmp_path / "full", RECIPES[name], "full")
    comp = _run(pool, tmp_path / "compact", RECIPES[name], "compact")
    assert comp["ledger"] == "compact" and "ledger" not in full
    assert [(s["step"], s["in"], s["kept"]) for s in comp["steps"]] == [(s["step"], s["in"], s["kept"]) for s in full["steps"]]
    assert 0 < comp["kept"] < 3000
    assert (tmp_path / "compact" / "uids.npy").read_bytes() == (tmp_path / "full" / "uids.npy").read_bytes()
    assert not (tmp_path / "compact" / "decisions.parquet").exists()
    # the subset holds the same rows and columns (in pool order rather than uid order)
    a = pq.read_table(tmp_path / "full" / "subset.parquet").to_pandas()
    b = pq.read_table(tmp_path / "compact" / "subset.parquet").to_pandas()
    assert list(a.columns) == list(b.columns)
    pd.testing.assert_frame_equal(_sorted(a, ["uid"]), _sorted(b, ["uid"]), check_dtype=False)
    # the one documented command gives today's per-(uid, step) rows
    res = CliRunner().invoke(main, ["ledger", str(tmp_path / "compact"), "--out", str(tmp_path / "expanded.parquet")])
    assert res.exit_code == 0, res.output
    want = _sorted(pq.read_table(tmp_path / "full" / "decisions.parquet").to_pandas()[LEDGER_COLS], ["step_index", "uid"])
    got = _sorted(pq.read_table(tmp_path / "expanded.parquet").to_pandas()[LEDGER_COLS], ["step_index", "uid"])
    pd.testing.assert_frame_equal(want, got)
    # the compact form lists only drops for these recipes: far fewer rows than the full ledger
    led = pq.read_table(tmp_path / "compact" / engine.COMPACT_LEDGER)
    assert led.num_rows == int((~want.kept).sum()) < len(want)


def test_auto_keeps_the_full_ledger_for_small_pools_and_streams_large_ones(pool, tmp_path, monkeypatch):
    s = _run(pool, tmp_path / "auto_small", CLIP, "auto")
    assert "ledger" not in s and (tmp_path / "auto_small" / "decisions.parquet").exists()
    monkeypatch.setattr(engine, "COMPACT_MIN_ROWS", 1000)
    s = _run(pool, tmp_path / "auto_large", CLIP, "auto")
    assert s["ledger"] == "compact" and (tmp_path / "auto_large" / engine.COMPACT_LEDGER).exists()
    again = _run(pool, tmp_path / "auto_large", CLIP, "auto")
    assert again["up_to_date"]
    # switching the form in the same folder reruns and removes the other form's files
    _run(pool, tmp_path / "auto_large", CLIP, "full")
    assert not (tmp_path / "auto_large" / engine.COMPACT_LEDGER).exists()
    assert (tmp_path / "auto_large" / "decisions.parquet").exists()


def test_compact_refuses_recipes_that_cannot_stream(pool, tmp_path):
    text = "name: d\nsteps:\n  - dedup: {on: text, model: ViT-L-14}\n"
    with pytest.raises(CurateError, match="use --ledger full"):
        _run(pool, tmp_path / "d", text, "compact")


def test_compact_run_writes_the_report_from_the_expanded_ledger(pool, tmp_path):
    out = tmp_path / "rep"
    out.mkdir()
    (tmp_path / "rep.yaml").write_text(RECIPES["basic_clip"])
    s = filter_pool(FilterConfig(recipe=str(tmp_path / "rep.yaml"), pool=str(pool), out=str(out), report=True,
                                 progress=False, ledger="compact", workers=1))
    html = (out / "report.html").read_text()
    assert s["ledger"] == "compact" and "0.basic" in html and "1.clip_score" in html and "Dropped samples" in html
    assert not (out / ".cache").exists()  # the expanded per-step files were temporary
