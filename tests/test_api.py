"""The Python API: every stage reachable from `curate`, lazily, and the README's example runs as written."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import curate

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "duckdb", "open_clip", "faiss", "pyarrow")


def test_every_api_name_resolves_to_its_stage():
    for name, target in curate.API.items():
        module, attr = target.split(":")
        assert getattr(curate, name) is getattr(importlib.import_module(module), attr), name
    assert set(curate.API) <= set(dir(curate))


def test_unknown_name_is_an_attribute_error():
    try:
        curate.no_such_stage  # noqa: B018
    except AttributeError as e:
        assert "no_such_stage" in str(e)
    else:
        raise AssertionError("curate.no_such_stage resolved")


def test_import_and_help_load_no_heavy_library():
    code = ("import sys, curate\n"
            "from curate.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"print('LOADED', [m for m in {HEAVY!r} if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True).stdout
    assert "LOADED []" in out, out
    assert "filter" in out and "Usage" in out


def readme_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- python-api-example[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md has no python-api-example block"
    return m.group(1)


def test_readme_python_example_runs(tmp_path):
    from tests.pool_factory import make_pool

    fp = make_pool(tmp_path / "work" / "pool", n_shards=2, per_shard=12, corrupt=1, failed=2)
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert r.returncode == 0, r.stderr
    n_success = sum(len(fp.success_uids(s)) for s in range(2))
    assert f"{n_success} of 24 pool rows kept" in r.stdout
    assert (tmp_path / "work" / "subsets" / "no_filter" / "shards").is_dir()


def test_no_api_name_is_shadowed_by_a_subpackage():
    # `import curate.embed.stage` sets the attribute curate.embed to the package: an API name equal to a
    # subpackage's name would silently turn into a module
    packages = {p.name for p in (REPO / "curate").iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in (REPO / "curate").glob("*.py")}
    assert not (set(curate.API) & (packages | modules))
