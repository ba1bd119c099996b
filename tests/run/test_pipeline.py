"""`curate run` end to end at the `debug` scale on a tiny pool, its idempotence, and `curate train-scorer`."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner

from curate.core import atomic
from curate.core.errors import CurateError
from tests.pool_factory import make_pool

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def evalsets(tmp_path_factory) -> Path:
    """Fashion-MNIST and digits (the offline tasks that need no pool build), 40 samples each."""
    from benchmark.evalsets import BuildOfflineConfig, build_offline

    out = tmp_path_factory.mktemp("evalsets")
    summary = build_offline(BuildOfflineConfig(out=out, limit=40))
    built = [k for k, v in summary.items() if v["status"] != "missing"]
    if not built:
        pytest.skip(f"no offline evaluation set could be built: {summary}")
    return out


def _recipe(path: Path, name: str, steps: str = "[]") -> Path:
    atomic.write_text(path, f"name: {name}\nsteps: {steps}\n")
    return path


def test_run_debug_end_to_end_then_up_to_date(tmp_path, evalsets, monkeypatch):
    import curate.filter.recipe as recipe_mod
    from benchmark.leaderboard import standings
    from benchmark.submit import VerifyConfig, verify
    from curate.run.pipeline import RunConfig, StageLog, run_recipe

    parsed: list[str] = []  # every parse of a recipe, by source (load_recipe goes through parse_recipe)
    real_parse = recipe_mod.parse_recipe
    monkeypatch.setattr(recipe_mod, "parse_recipe", lambda text, source="<recipe>": parsed.append(source)
                        or real_parse(text, source))

    fp = make_pool(tmp_path / "pool", n_shards=2, per_shard=24, corrupt=1, failed=2)
    recipe = _recipe(tmp_path / "nf.yaml", "no_filter")
    db = tmp_path / "lb.duckdb"
    cfg = RunConfig(recipe=recipe, scale="debug", pool=fp.pool, seeds=[0], work=tmp_path / "work",
                    evalsets=evalsets, db=db, device="cpu", train_workers=1, progress=False)
    lines: list[str] = []
    out = run_recipe(cfg, StageLog(total=5, echo=lines.append))
    assert [r["status"] for r in out["stages"]] == ["done"] * 5
    assert parsed == [str(recipe)]  # the recipe is parsed once per run, not once per stage
    run = Path(out["runs"][0])
    assert (run / "eval_results.jsonl").is_file() and (run / "final.pt").is_file()
    # every successfully downloaded uid reaches the subset (no_filter), and the bundle verifies against the pool
    bundle = Path(out["bundles"][0])
    decl = json.loads((bundle / "bundle.json").read_text())
    assert decl["subset_size"] == len(fp.success_uids())
    assert decl["scale"] == "debug" and decl["official"] is True
    rep = verify(VerifyConfig(bundle=bundle, pool=fp.pool))
    assert rep.ok, rep.reasons
    rep = verify(VerifyConfig(bundle=Path(str(bundle) + ".tar.gz"), pool=fp.pool))
    assert rep.ok, rep.reasons
    rows = standings(db, "debug")
    assert [r.name for r in rows] == ["no_filter"] and rows[0].subset_size == len(fp.success_uids())
    assert "no_filter" in out["table"]
    # second run: every stage reports up to date and nothing is retrained
    mtime = (run / "final.pt").stat().st_mtime_ns
    lines.clear()
    out2 = run_recipe(cfg, StageLog(total=5, echo=lines.append))
    assert [r["status"] for r in out2["stages"]] == ["up_to_date"] * 5, lines
    assert parsed == [str(recipe)] * 2
    assert (run / "final.pt").stat().st_mtime_ns == mtime
    assert len(standings(db, "debug")) == 1


def test_run_cli_errors_are_clear(tmp_path):
    from curate.cli import main

    fp = make_pool(tmp_path / "pool", n_shards=1, per_shard=6, corrupt=0, failed=0)
    recipe = _recipe(tmp_path / "r.yaml", "r")
    r = CliRunner().invoke(main, ["run", "--recipe", str(recipe), "--scale", "nope", "--pool", str(fp.pool),
                                  "--work", str(tmp_path / "w")])
    assert r.exit_code == 2 and "unknown scale 'nope'" in r.output
    r = CliRunner().invoke(main, ["run", "--recipe", str(recipe), "--scale", "debug", "--pool", str(fp.pool),
                                  "--seeds", "1,x"])
    assert r.exit_code == 2 and "--seeds" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nsteps:\n  - no_such_filter: {}\n")
    r = CliRunner().invoke(main, ["run", "--recipe", str(bad), "--scale", "debug", "--pool", str(fp.pool),
                                  "--work", str(tmp_path / "w")])
    assert r.exit_code == 2 and "bad.yaml:3" in r.output


def test_train_scorer_on_trusted_rows(tmp_path):
    from curate.clip.models import load_model
    from curate.run.scorer import ScorerConfig, train_scorer, trusted_uids

    fp = make_pool(tmp_path / "pool", n_shards=2, per_shard=50, corrupt=0, failed=3)
    # ground truth: the first 80 rows are "tuxpaint", 8 of them noisy; the rest "openclipart"
    rows = fp.rows
    source = ["tuxpaint" if i < 80 else "openclipart" for i in range(len(rows))]
    noise = ["caption_swap" if i % 10 == 0 else "none" for i in range(len(rows))]
    truth = tmp_path / "truth.parquet"
    atomic.write_parquet(truth, pa.table({"uid": fp.all_uids, "source": source, "noise": noise}))
    failed = set(fp.failed_uids)
    expected = sorted(u for i, u in enumerate(fp.all_uids) if i < 80 and i % 10 and u not in failed)
    uids, counts = trusted_uids(fp.pool, truth, ("tuxpaint", "twemoji"))
    assert uids == expected and counts["trusted_downloaded"] == len(expected)

    out = tmp_path / "scorer.pt"
    s = train_scorer(ScorerConfig(pool=fp.pool, out=out, truth=truth, scale="debug", device="cpu", workers=1,
                                  progress=False))
    assert s["trusted_rows"] == len(expected) and s["arch"] == "curate-debug" and not s["up_to_date"]
    lm = load_model("curate-debug", str(out), "cpu")  # a plain open_clip checkpoint
    assert lm.model_id.startswith("curate-debug__")
    assert train_scorer(ScorerConfig(pool=fp.pool, out=out, truth=truth, scale="debug", device="cpu", workers=1,
                                     progress=False))["up_to_date"]
    with pytest.raises(CurateError, match="missing column 'noise'"):
        bad = tmp_path / "bad_truth.parquet"
        atomic.write_parquet(bad, pa.table({"uid": fp.all_uids, "source": source}))
        trusted_uids(fp.pool, bad, ("tuxpaint",))
    with pytest.raises(CurateError, match="too few"):
        train_scorer(ScorerConfig(pool=fp.pool, out=tmp_path / "x.pt", truth=truth, sources=("twemoji",),
                                  scale="debug", progress=False))


def test_caption_swap_auc_hand_computed(tmp_path):
    from curate.run.scorer import caption_swap_auc

    uids = [f"{i:032x}" for i in range(6)]
    emb = tmp_path / "pool" / "embeddings" / "m__x"
    # clean: 0.9, 0.5, 0.3 ; swapped: 0.5, 0.1 ; a row of another noise kind is ignored ; NaN rows are ignored
    atomic.write_parquet(emb / "00000000.parquet", pa.table({
        "uid": uids, "clip_score": pa.array([0.9, 0.5, 0.3, 0.5, 0.1, 0.99], pa.float32())}))
    truth = tmp_path / "truth.parquet"
    atomic.write_parquet(truth, pa.table({"uid": uids, "noise": ["none"] * 3 + ["caption_swap"] * 2 + ["exact_dup"]}))
    r = caption_swap_auc(tmp_path / "pool", "m__x", truth)
    # pairs (clean > swapped): 0.9>0.5, 0.9>0.1, 0.5=0.5 (half), 0.5>0.1, 0.3>0.1 ; 0.3<0.5 -> 4.5 / 6
    assert r == {"auc": pytest.approx(4.5 / 6), "n_clean": 3, "n_swapped": 2}
    with pytest.raises(CurateError, match="no embeddings"):
        caption_swap_auc(tmp_path / "pool", "other__y", truth)
