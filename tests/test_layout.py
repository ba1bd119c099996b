"""The layout is the data flow: packages import only downward, with no circles and no private names.

The floor order (lowest first) is written in CONTRIBUTING.md; this test is what enforces it. Every import of
the project's own modules counts, function-local ones included (a lazy import still ties two modules).
"""

from __future__ import annotations

import ast
from pathlib import Path

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
