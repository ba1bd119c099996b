"""Recipe validation: every bad recipe gets an error naming file, line and field, before any work."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import numpy as np
import pytest

from curate.core.errors import CurateError
from curate.filter.recipe import SetOp, load_recipe, parse_recipe, resolve_models
from tests.metadata_factory import write_embeddings, write_metadata

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def _err(tmp_path: Path, text: str) -> str:
    p = _write(tmp_path, text)
    with pytest.raises(CurateError) as e:
        load_recipe(p)
    return e.value.message


def test_all_shipped_recipes_are_valid():
    names = sorted(p.stem for p in RECIPES.glob("*.yaml"))
    assert names == sorted(["no_filter", "basic", "text_based", "image_based", "laion2b", "clip_b32_30pct",
                            "clip_l14_30pct", "image_based_x_clip_l14_30pct"])
    for p in RECIPES.glob("*.yaml"):
        r = load_recipe(p)
        assert r.name == p.stem
        assert "DataComp" in p.read_text().split("name:")[0], f"{p.name} must cite the DataComp rule it reproduces"
    r = load_recipe(RECIPES / "image_based_x_clip_l14_30pct.yaml")
    assert isinstance(r.steps[0], SetOp) and r.steps[0].op == "intersect"
    assert [b[0].name for b in r.steps[0].branches] == ["image_based", "clip_score"]


def test_unknown_step_names_file_line_and_field(tmp_path):
    msg = _err(tmp_path, """\
        name: x
        steps:
          - basic: {}
          - clip_scor: {threshold: 0.3}
        """)
    assert msg.startswith(f"{tmp_path / 'r.yaml'}:4: steps[1]: unknown step 'clip_scor'")
    assert "clip_score" in msg  # lists the known steps


def test_unknown_param_key(tmp_path):
    msg = _err(tmp_path, """\
        name: x
        steps:
          - basic:
              min_words: 3
              min_wrds: 4
        """)
    assert ":5: steps[0].basic.min_wrds: unknown parameter of 'basic'" in msg
    assert "min_words" in msg


def test_wrong_type(tmp_path):
    msg = _err(tmp_path, """\
        name: x
        steps:
          - basic: {min_words: three}
        """)
    assert ":3: steps[0].basic.min_words: expected int, got 'three'" in msg
    msg = _err(tmp_path, """\
        name: x
        steps:
          - basic: {english: "yes"}
        """)
    assert "steps[0].basic.english: expected bool" in msg


def test_out_of_range_and_cross_field_rules(tmp_path):
    msg = _err(tmp_path, """\
        name: x
        steps:
          - clip_score:
              keep_top_fraction: 1.5
        """)
    assert ":4: steps[0].clip_score.keep_top_fraction: 1.5 is above the maximum 1.0" in msg
    msg = _err(tmp_path, """\
        name: x
        steps:
          - clip_score: {keep_top_fraction: 0}
        """)
    assert "must be greater than 0" in msg
    msg = _err(tmp_path, """\
        name: x
        steps:
          - clip_score: {model: ViT-B-32}
        """)
    assert ":3: steps[0].clip_score.threshold: give exactly one of threshold or keep_top_fraction" in msg


def test_top_level_and_structure_errors(tmp_path):
    assert ":2: nme: unknown key" in _err(tmp_path, "name: x\nnme: y\nsteps: []\n")
    assert "steps: missing required key" in _err(tmp_path, "name: x\n")
    assert ":3: steps[0]: each step is a mapping with exactly one key" in _err(
        tmp_path, "name: x\nsteps:\n  - {basic: {}, clip_score: {threshold: 0.2}}\n")
    assert "expected a list of at least two sub-recipes" in _err(
        tmp_path, "name: x\nsteps:\n  - union: [[basic: {}]]\n")
    assert ":5: steps[0].intersect[1][0]: unknown step 'nope'" in _err(
        tmp_path, "name: x\nsteps:\n  - intersect:\n    - [basic: {}]\n    - [nope: {}]\n")
    assert "duplicate key" in _err(tmp_path, "name: x\nname: y\nsteps: []\n")
    assert ":4: not valid YAML" in _err(tmp_path, "name: x\nsteps:\n  - basic: {min_words: [\n")  # broken YAML


def test_yaml_python_tags_are_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    msg = _err(tmp_path, f"""\
        name: x
        steps:
          - basic: {{min_words: !!python/object/apply:os.system ["touch {marker}"]}}
        """)
    assert ":3:" in msg
    assert not marker.exists()


def test_missing_embeddings_for_the_steps_model(tmp_path):
    pool = tmp_path / "pool"
    write_metadata(pool, n_rows=20)
    write_embeddings(pool, "curate-debug__aaaaaaaaaaaa", dim=8)
    r = parse_recipe("name: x\nsteps:\n  - basic: {}\n  - clip_score: {model: ViT-L-14, keep_top_fraction: 0.3}\n",
                     "r.yaml")
    with pytest.raises(CurateError) as e:
        resolve_models(r, pool)
    assert e.value.message.startswith("r.yaml:4: steps 1.clip_score: model: no embeddings for architecture ViT-L-14")
    assert "curate-debug__aaaaaaaaaaaa" in e.value.message
    # The architecture's only embeddings folder is used when no weights are named.
    r = parse_recipe("name: x\nsteps:\n  - clip_score: {model: curate-debug, threshold: 0.3}\n", "r.yaml")
    resolve_models(r, pool)
    assert r.steps[0].model_id == "curate-debug__aaaaaaaaaaaa"
    # Named weights that were never embedded: error names the expected id and how to fix it.
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"not really weights")
    r = parse_recipe(f"name: x\npretrained: {ckpt}\nsteps:\n  - clip_score: {{model: curate-debug, threshold: 0.3}}\n",
                     "r.yaml")
    with pytest.raises(CurateError, match=r"r.yaml:4: .*no embeddings for curate-debug__[0-9a-f]{12}.*curate embed"):
        resolve_models(r, pool)


def test_recipe_hash_ignores_comments_but_not_params():
    a = parse_recipe("name: x\nsteps:\n  - basic: {}\n")
    b = parse_recipe("# a comment\nname: x\nsteps:\n  - basic: {min_words: 3}\n")
    c = parse_recipe("name: x\nsteps:\n  - basic: {min_words: 4}\n")
    assert a.hash() == b.hash() != c.hash()


def test_yaml_1_1_boolean_words_are_keys_and_strings():
    # the original design's own example: under YAML 1.1 a bare `on` is the boolean True.
    r = parse_recipe("name: d\nsteps:\n  - dedup: {on: image, threshold: 0.95}\n", "d.yaml")
    (step,) = r.all_steps()
    assert step.params.on == "image"
    with pytest.raises(CurateError, match="d.yaml:3"):
        parse_recipe("name: d\nsteps:\n  - basic: {english: yes}\n", "d.yaml")  # `yes` is a string now
    ok = parse_recipe("name: d\nsteps:\n  - basic: {english: false}\n", "d.yaml")
    assert ok.all_steps()[0].params.english is False


def test_path_parameters_are_read_from_the_recipe_folder_and_checked_with_their_line(tmp_path, monkeypatch):
    from curate.filter.recipe import check_paths

    folder = tmp_path / "recipes"
    folder.mkdir()
    np.save(folder / "t.npy", np.eye(4, dtype=np.float32))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # not where the recipe is: the rule ignores the working directory
    body = """\
        name: x
        steps:
          - image_based:
              model: curate-debug
              target: t.npy
          - union:
              - [basic: {}]
              - - decontaminate:
                    evalsets: evals/missing
        """
    p = folder / "r.yaml"
    p.write_text(textwrap.dedent(body))
    r = load_recipe(p)
    ib, _, dec = r.all_steps()
    assert ib.paths == {"target": str(folder / "t.npy")} and ib.param_lines["target"] == 5
    with pytest.raises(CurateError) as e:
        check_paths(r)
    assert e.value.message.startswith(f"{p}:9: steps 1.1.0.decontaminate: evalsets: evals/missing: no such file")
    assert str(folder / "evals" / "missing") in e.value.message
    (folder / "evals" / "missing").mkdir(parents=True)
    check_paths(r)  # every path exists now
    with pytest.raises(CurateError, match=r"r.yaml:3: steps 0.text_based: synsets_file: empty path"):
        check_paths(load_recipe(_write(tmp_path, "name: x\nsteps:\n  - text_based: {synsets_file: '  '}\n")))


def test_a_missing_path_parameter_stops_the_filter_stage_before_any_work(tmp_path):
    from curate.filter.engine import FilterConfig, filter_pool

    pool = tmp_path / "pool"
    write_metadata(pool, n_rows=20)
    write_embeddings(pool, "curate-debug__aaaaaaaaaaaa", dim=8)
    p = _write(tmp_path, "name: x\nsteps:\n  - basic: {}\n  - image_based: {target: targets/none.npy}\n")
    with pytest.raises(CurateError, match=r"r.yaml:4: steps 1.image_based: target: targets/none.npy: no such file"):
        filter_pool(FilterConfig(recipe=str(p), pool=str(pool), out=str(tmp_path / "out"), progress=False))
    assert not (tmp_path / "out").exists()


def test_embedding_params_are_validated_with_their_line(tmp_path):
    msg = _err(tmp_path, "name: x\nsteps:\n  - dedup:\n      on: image\n      model: ''\n")
    assert ":5: steps[0].dedup.model: expected a name without surrounding spaces" in msg
    msg = _err(tmp_path, "name: x\nsteps:\n  - clip_score: {pretrained: ' x', threshold: 0.2}\n")
    assert ":3: steps[0].clip_score.pretrained: expected a name" in msg


def test_each_steps_model_is_resolved_once_per_run_and_used_from_the_step(tmp_path, monkeypatch):
    import curate.filter.engine as engine
    import curate.filter.recipe as recipe_mod
    from curate.filter.engine import FilterConfig, filter_pool

    pool = tmp_path / "pool"
    write_metadata(pool, n_rows=60)
    write_embeddings(pool, "curate-debug__aaaaaaaaaaaa", dim=8)
    calls: list[str] = []
    real = recipe_mod.resolve_step_model

    def counted(step, *a):
        calls.append(step.id)
        # marked weights: the engine's image embedder must show them, i.e. take the model from the step
        return dataclasses.replace(real(step, *a), weights=f"w-{step.id}")

    monkeypatch.setattr(recipe_mod, "resolve_step_model", counted)
    contexts: list[dict] = []
    real_ctx = engine.step_context
    monkeypatch.setattr(engine, "step_context", lambda *a: contexts.append(real_ctx(*a)) or contexts[-1])
    p = _write(tmp_path, """\
        name: x
        steps:
          - basic: {english: false}
          - clip_score: {model: curate-debug, keep_top_fraction: 0.5}
          - dedup: {on: image, threshold: 0.99}
        """)
    s = filter_pool(FilterConfig(recipe=str(p), pool=str(pool), out=str(tmp_path / "out"), progress=False))
    assert calls == ["1.clip_score", "2.dedup"]  # once per step that reads embeddings, none for basic
    assert s["kept"] > 0
    embedders = [c["embed_image_paths"] for c in contexts if "embed_image_paths" in c]
    assert [(e.arch, e.pretrained) for e in embedders] == [("curate-debug", "w-1.clip_score"),
                                                            ("curate-debug", "w-2.dedup")]
