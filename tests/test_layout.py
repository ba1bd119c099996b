"""The layout is the data flow: packages import only downward, with no circles and no private names.

The floor order (lowest first) is written in CONTRIBUTING.md; this test is what enforces it. Every import of
the project's own modules counts, function-local ones included (a lazy import still ties two modules).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT = ("curate", "filters", "benchmark", "perf")

# Floors, lowest first. A module may import its own floor's package and any lower floor; packages that
# share a floor are siblings and may not import each other.
FLOORS: list[tuple[str, ...]] = [
    ("curate.core",),
    ("curate.clip", "curate.lib"),
    ("curate.pool", "filters"),
    ("curate.embed", "curate.filter", "curate.reshard"),
    ("benchmark",),
    ("curate.run",),
    ("curate.cli", "curate"),
    ("perf",),
]
# filters stand beside the pool floor but may use only the kernel, the model factory and the libraries.
ONLY: dict[str, tuple[str, ...]] = {"filters": ("filters", "curate.core", "curate.clip", "curate.lib")}


def package_of(module: str) -> str:
    """The floor package a dotted module belongs to (longest listed prefix)."""
    best = None
    for floor in FLOORS:
        for pkg in floor:
            if (module == pkg or module.startswith(pkg + ".")) and (best is None or len(pkg) > len(best)):
                best = pkg
    if best is None:
        raise AssertionError(f"{module}: not on any floor; add its package to FLOORS and CONTRIBUTING.md")
    return best


def floor_of(pkg: str) -> int:
    return next(i for i, floor in enumerate(FLOORS) if pkg in floor)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_files() -> list[Path]:
    files = []
    for top in PROJECT:
        files += sorted((REPO / top).rglob("*.py"))
    return files


def imports_of(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) for every import of a project module in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    me = module_name(path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PROJECT:
                    out.append((node.lineno, a.name, []))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.split(".")[: -node.level + (1 if path.name == "__init__.py" else 0) or None]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] not in PROJECT:
                continue
            names = [a.name for a in node.names]
            # `from pkg import submodule` imports the submodule
            subs = [n for n in names if (REPO / Path(*mod.split("."), n)).with_suffix(".py").is_file()
                    or (REPO / Path(*mod.split("."), n) / "__init__.py").is_file()]
            for s in subs:
                out.append((node.lineno, f"{mod}.{s}", []))
            rest = [n for n in names if n not in subs]
            if rest or not subs:
                out.append((node.lineno, mod, rest))
    return out


def edges() -> dict[str, list[tuple[str, int, str, list[str]]]]:
    graph: dict[str, list] = {}
    for f in project_files():
        graph[module_name(f)] = [(f.relative_to(REPO).as_posix(), line, mod, names) for line, mod, names in imports_of(f)]
    return graph


def test_floor_order():
    bad = []
    for me, imps in edges().items():
        mine = package_of(me)
        for where, line, mod, _ in imps:
            theirs = package_of(mod)
            if theirs == mine:
                continue
            allowed = ONLY.get(mine)
            if allowed is not None:
                ok = any(theirs == a or theirs.startswith(a + ".") for a in allowed)
            else:
                ok = floor_of(theirs) < floor_of(mine) or (mine == "curate.cli" and theirs != "curate") or mine == "perf"
            if mine == "curate" and theirs != "curate":
                # the package API (curate/__init__.py) re-exports stages lazily; it stands on the top floor
                ok = True
            if not ok:
                bad.append(f"{where}:{line}: {mine} (floor {floor_of(mine)}) imports {mod} ({theirs}, floor {floor_of(theirs)})")
    assert not bad, "imports against the floor order (CONTRIBUTING.md):\n" + "\n".join(bad)


def test_no_private_names_across_modules():
    bad = []
    for me, imps in edges().items():
        for where, line, mod, names in imps:
            if mod == me:
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{where}:{line}: imports private {mod}.{n}")
    assert not bad, "private names imported across modules (make them public or move them):\n" + "\n".join(bad)


def test_no_import_circles():
    graph: dict[str, set[str]] = {}
    known = set(edges())
    for me, imps in edges().items():
        targets = set()
        for _, _, mod, _ in imps:
            # an import of a.b.c ties me to the deepest project module named by it
            while mod and mod not in known:
                mod = mod.rpartition(".")[0]
            if mod and mod != me:
                targets.add(mod)
        graph[me] = targets
    # a package's __init__ is imported by its submodules implicitly; it must not import them back at
    # module level, which the floor test does not see, so circles are checked over the explicit imports only
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                cycles.append(" -> ".join(stack[stack.index(m):] + [m]))
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import circles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("package", sorted({p for floor in FLOORS for p in floor} - {"curate", "curate.cli"}))
def test_every_floor_package_exists(package):
    path = REPO / Path(*package.split("."))
    assert (path / "__init__.py").is_file(), f"{package}: listed in FLOORS but has no package folder"



# ------------------------------------------------------------------------------------------------------------
# One owner per concern (issue 16): calls that only their owning module may make. Each rule is a name, the
# owning module, the other modules allowed with the reason each, and a finder over a module's syntax tree
# returning (line, what) for every use. `rule_violations` runs a rule over any tree of files, so the rules are
# checked on the project and, with planted violations, on a tmp folder. A new rule is one more `OwnedRule`.

@dataclass(frozen=True)
class OwnedRule:
    name: str
    owner: str | None  # the one module allowed (repo-relative path); None: nobody may
    allowed: dict[str, str]  # other modules allowed, with the reason
    find: Callable[[ast.AST], list[tuple[int, str]]]
    fix: str  # what to do instead, for the failure message


def _aliases(tree: ast.AST, module: str) -> set[str]:
    """Names `module` is bound to in this file (``import tarfile as t`` -> {"t"})."""
    names = {module}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name for a in node.names if a.name == module}
    return names


def _str_arg(call: ast.Call, pos: int, kw: str) -> str | None:
    """A call's string-constant argument, given by position or keyword (None when absent or not a literal)."""
    node = call.args[pos] if len(call.args) > pos else next((k.value for k in call.keywords if k.arg == kw), None)
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _tar_opens(tree: ast.AST, writers: bool) -> list[tuple[int, str]]:
    """`tarfile.open(...)` / `tarfile.TarFile(...)` calls that read (writers=False) or write (writers=True)."""
    mods = _aliases(tree, "tarfile")
    imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "tarfile"
                for a in n.names if a.name in ("open", "TarFile")}
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        hit = ((isinstance(f, ast.Attribute) and f.attr in ("open", "TarFile") and isinstance(f.value, ast.Name)
                and f.value.id in mods)
               or (isinstance(f, ast.Attribute) and f.attr == "open" and isinstance(f.value, ast.Attribute)
                   and f.value.attr == "TarFile")
               or (isinstance(f, ast.Name) and f.id in imported))
        if not hit:
            continue
        mode = _str_arg(node, 1, "mode") or "r"
        if mode.startswith(("w", "x", "a")) == writers:
            out.append((node.lineno, f"tarfile.open(mode={mode!r})"))
    return out


def _max_pixels_assignments(tree: ast.AST) -> list[tuple[int, str]]:
    """Assignments to PIL's process-wide `Image.MAX_IMAGE_PIXELS` (plain, augmented, annotated or setattr)."""
    out = []
    for node in ast.walk(tree):
        targets = (node.targets if isinstance(node, ast.Assign) else
                   [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        out += [(node.lineno, "Image.MAX_IMAGE_PIXELS = ...") for t in targets
                if isinstance(t, ast.Attribute) and t.attr == "MAX_IMAGE_PIXELS"]
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
                and _str_arg(node, 1, "name") == "MAX_IMAGE_PIXELS"):
            out.append((node.lineno, "setattr(Image, 'MAX_IMAGE_PIXELS', ...)"))
    return out


def _open_clip_factory_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """Calls of open_clip's model factory (`create_model`, `create_model_and_transforms`, ...), or imports of it."""
    mods = _aliases(tree, "open_clip")
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "open_clip":
            out += [(node.lineno, f"from {node.module} import {a.name}") for a in node.names
                    if a.name.startswith("create_model")]
        elif (isinstance(node, ast.Attribute) and node.attr.startswith("create_model")
              and isinstance(node.value, (ast.Name, ast.Attribute))
              and (getattr(node.value, "id", None) in mods or getattr(node.value, "attr", None) == "factory")):
            out.append((node.lineno, f"open_clip.{node.attr}"))
    return out


OWNED_RULES = [
    OwnedRule(
        "reading tars", "curate/core/tar_reader.py",
        {
            "curate/pool/download.py": "the pool's writer: it merges the downloader's staged tar and the shard's "
                                       "previous version, member by name, into the shard it then writes",
            "benchmark/evalsets.py": "evaluation sets, not pool shards: counts the labels of a set it built",
            "benchmark/evaluate.py": "evaluation sets, not pool shards: counts a set's items from its headers",
            "benchmark/submit.py": "submission bundles, not webdataset shards: extracted with tarfile's data "
                                   "filter under its own member and size caps",
            "perf/bench_dedup.py": "a perf fixture: the baseline reads the shards its own way, timed against ours",
        },
        lambda tree: _tar_opens(tree, writers=False),
        "read shards with curate.pool.io.iter_samples / iter_members (curate.core.tar_reader)"),
    OwnedRule(
        "writing tars", None,
        {
            "curate/pool/download.py": "writes the pool's shards",
            "curate/reshard/stage.py": "writes a subset's output shards",
            "benchmark/submit.py": "writes submission bundles",
            "perf/calibrate_tiny.py": "writes the fixture shards it trains on",
        },
        lambda tree: _tar_opens(tree, writers=True),
        "list the module here with what it writes (a new writer of pool shards belongs in the pool package)"),
    OwnedRule(
        "assigning Image.MAX_IMAGE_PIXELS", None, {}, _max_pixels_assignments,
        "pass the cap per call: curate.core.images.decode_image(data, max_pixels=...)"),
    OwnedRule(
        "building open_clip models", "curate/clip/models.py",
        {"perf/gpu_check.py": "made to run from a bare checkout without the project's venv (open_clip optional)"},
        _open_clip_factory_calls,
        "use curate.clip.models.load_model / create_model_for_training"),
]


def rule_violations(rule: OwnedRule, root: Path, files: list[Path]) -> list[str]:
    out = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        if rel == rule.owner or rel in rule.allowed:
            continue
        tree = ast.parse(f.read_text(encoding="utf-8"), filename=str(f))
        out += [f"{rel}:{line}: {what}" for line, what in rule.find(tree)]
    return out


@pytest.mark.parametrize("rule", OWNED_RULES, ids=lambda r: r.name.replace(" ", "_"))
def test_only_the_owning_module_does_it(rule):
    bad = rule_violations(rule, REPO, project_files())
    assert not bad, f"{rule.name} outside {rule.owner or 'the listed modules'} ({rule.fix}):\n" + "\n".join(bad)
    for rel in [rule.owner, *rule.allowed] if rule.owner else rule.allowed:
        assert (REPO / rel).is_file(), f"{rule.name}: {rel} is listed but does not exist"
    # every listed module still needs its exception (a stale one would hide a later regression there)
    stale = [rel for rel in rule.allowed if not rule.find(ast.parse((REPO / rel).read_text(encoding="utf-8")))]
    assert not stale, f"{rule.name}: listed but no longer needed: {stale}"


PLANTED = '''
import tarfile as tf
import open_clip
from PIL import Image
from open_clip import create_model_and_transforms

Image.MAX_IMAGE_PIXELS = None
setattr(Image, "MAX_IMAGE_PIXELS", 10)
open_clip.create_model("ViT-B-32")
with tf.open("pool/shards/00000000.tar") as t:
    pass
with tf.open("out.tar", mode="w") as t:
    pass
tf.TarFile.open("x.tar", "r:*")
'''


def test_rules_catch_planted_violations(tmp_path):
    # the same planted module outside every owner, and as the owner of each rule that has one
    expected = {"reading tars": [10, 14], "writing tars": [12], "assigning Image.MAX_IMAGE_PIXELS": [7, 8],
                "building open_clip models": [5, 9]}
    outside = tmp_path / "curate" / "filter" / "sneaky.py"
    owners = [tmp_path / r.owner for r in OWNED_RULES if r.owner]
    for f in [outside, *owners]:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(PLANTED)
    for rule in OWNED_RULES:
        found = rule_violations(rule, tmp_path, [outside, *owners])
        lines = sorted(int(v.split(":")[1]) for v in found if v.startswith("curate/filter/sneaky.py:"))
        assert lines == expected[rule.name], (rule.name, found)
        if rule.owner:
            assert not [v for v in found if v.startswith(rule.owner + ":")], (rule.name, found)


# Starting Ray or a process pool (issue 16): only the one bounded-parallel map does it. An `OwnedRule` like the
# ones above, kept out of OWNED_RULES so their planted test stays as it is; tests/ is not scanned (tests start
# their own pools to exercise a helper's concurrency, e.g. tests/lib/test_wordnet.py).

def _parallel_starts(tree: ast.AST) -> list[tuple[int, str]]:
    """`ray.init`, `ProcessPoolExecutor` (any reference) and `multiprocessing.Pool` / `get_context(...).Pool`."""
    mp = _aliases(tree, "multiprocessing")
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("multiprocessing", "concurrent.futures",
                                                                "concurrent.futures.process"):
            out += [(node.lineno, f"from {node.module} import {a.name}") for a in node.names
                    if a.name in ("Pool", "ProcessPoolExecutor")]
        elif isinstance(node, ast.Attribute):
            v = node.value
            if node.attr == "init" and isinstance(v, ast.Name) and v.id == "ray":
                out.append((node.lineno, "ray.init"))
            elif node.attr == "ProcessPoolExecutor":
                out.append((node.lineno, "ProcessPoolExecutor"))
            elif node.attr == "Pool" and ((isinstance(v, ast.Name) and v.id in mp) or (
                    isinstance(v, ast.Call) and getattr(v.func, "attr", getattr(v.func, "id", None)) == "get_context")):
                out.append((node.lineno, "multiprocessing Pool"))
        elif isinstance(node, ast.Name) and node.id == "ProcessPoolExecutor":
            out.append((node.lineno, "ProcessPoolExecutor"))
    return out


PARALLEL_RULE = OwnedRule(
    "starting Ray or a process pool", "curate/core/parallel.py",
    {"perf/bench_datacomp.py": "the baseline is DataComp's reference selection script, with its mp.Pool"},
    _parallel_starts, "use curate.core.parallel: pmap, actor_map or ray_session")


def test_ray_init_and_process_pools_only_in_the_parallel_map(tmp_path):
    bad = rule_violations(PARALLEL_RULE, REPO, project_files())
    assert not bad, f"{PARALLEL_RULE.name} outside {PARALLEL_RULE.owner} ({PARALLEL_RULE.fix}):\n" + "\n".join(bad)
    assert _parallel_starts(ast.parse((REPO / "perf/bench_datacomp.py").read_text())), "stale exception"
    planted = tmp_path / "curate" / "filter" / "sneaky.py"
    planted.parent.mkdir(parents=True)
    planted.write_text("import ray\nimport multiprocessing as m\nfrom concurrent.futures import ProcessPoolExecutor\n"
                       "import concurrent.futures as cf\nray.init()\nm.Pool(2)\nm.get_context('spawn').Pool(2)\n"
                       "cf.ProcessPoolExecutor(2)\n")
    found = rule_violations(PARALLEL_RULE, tmp_path, [planted])
    assert sorted(int(v.split(":")[1]) for v in found) == [3, 5, 6, 7, 8], found
