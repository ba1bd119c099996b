"""Recipe YAML: schema, validation with file:line:field errors, and model resolution.

A recipe is validated completely before any work starts, so a typo in step 4 never costs the time
of steps 1-3. Every error names ``FILE:LINE: FIELD: problem`` using the YAML node marks (parsed with
yaml's SafeLoader only: no tags that construct Python objects).

    name: clip_l14_30pct            # required
    pool: pool/                     # optional, the CLI's --pool overrides it
    seed: 0                         # optional, passed to every filter (k-means, ...)
    model: ViT-L-14                 # optional default model for steps that read embeddings
    pretrained: /ckpt/l14.pt        # optional default weights (tag or local checkpoint)
    steps:
      - basic: {min_words: 3}
      - intersect:                  # set operations over sub-recipes, each a list of steps
          - [{image_based: {target: evalsets/x/train}}]
          - [{clip_score: {keep_top_fraction: 0.3}}]

Step parameters are the filter's ``Params`` dataclass: unknown keys, wrong types and values outside
a field's ``metadata={"min": .., "max": ..}`` range are rejected; a Params ``check()`` method may
raise ``ValueError("field: message")`` for cross-field rules. Fields declared with
``metadata={"path": True}`` are paths, resolved by one rule (`filters.common.resolve_path`: relative to
the recipe file's folder) into ``Step.paths`` when the recipe is parsed; `check_paths` checks that they
exist before a run starts, naming ``FILE:LINE: steps ID: FIELD``.

The run resolves each step's model once (`resolve_models` -> `resolve_step_model`, the result in
``Step.model``); the filter engine reads it from there, and the recipe itself is parsed once per run
(`curate run` hands its parsed `Recipe` to the filter stage).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import pkgutil
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from curate.core.errors import CurateError
from filters.common import path_fields, resolve_path

SET_OPS = ("intersect", "union")
TOP_KEYS = ("name", "pool", "seed", "model", "pretrained", "steps")
EMBEDDING_COLUMNS = frozenset({"clip_score"})


def load_filters() -> dict[str, type]:
    """Import every module of the `filters` package so each registers itself; return the registry."""
    import filters
    from filters.base import REGISTRY

    for mod in pkgutil.iter_modules(filters.__path__):
        if mod.name != "base":
            importlib.import_module(f"filters.{mod.name}")
    return REGISTRY


@dataclass(frozen=True)
class StepModel:
    """The model a step reads, as `resolve_step_model` settled it once per run.

    arch: the architecture (the step's ``model``, the recipe's, or the one of the pool's only folder);
    weights: the tag or checkpoint embedding target images needs (None when none was named);
    model_id: the pool's embeddings folder the step reads.
    """

    arch: str
    weights: str | None
    model_id: str


@dataclass
class Step:
    """One filter step: the filter class, its validated params and where it came from."""

    name: str
    params: Any
    cls: type
    path: str  # position in the recipe, "1" or "2.0.1" inside a set operation
    line: int
    param_lines: dict[str, int] = field(default_factory=dict)  # line of each parameter given in the YAML
    paths: dict[str, str] = field(default_factory=dict)  # path parameters, resolved (filters.common.resolve_path)
    model: StepModel | None = None  # set by `resolve_models`

    @property
    def model_id(self) -> str | None:
        """Embeddings folder the step reads (None until `resolve_models`, or when it reads none)."""
        return self.model.model_id if self.model else None

    @property
    def id(self) -> str:
        """Ledger name of the step: position and filter, e.g. ``1.clip_score``."""
        return f"{self.path}.{self.name}"

    def needs_model(self) -> bool:
        return bool(self.cls.embeddings) or bool(EMBEDDING_COLUMNS & set(self.cls.columns))

    def describe(self) -> dict[str, Any]:
        return {"step": self.id, "filter": self.name, "params": dataclasses.asdict(self.params),
                "model_id": self.model_id}


@dataclass
class SetOp:
    """``intersect`` / ``union`` of sub-recipes that all start from the rows reaching this step."""

    op: str
    branches: list[list[Step | SetOp]]
    path: str
    line: int

    @property
    def id(self) -> str:
        return f"{self.path}.{self.op}"

    @property
    def name(self) -> str:
        return self.op

    def describe(self) -> dict[str, Any]:
        return {"step": self.id, "op": self.op,
                "branches": [[s.describe() for s in b] for b in self.branches]}


@dataclass
class Recipe:
    name: str
    steps: list[Step | SetOp]
    source: str
    pool: str | None = None
    seed: int = 0
    model: str | None = None
    pretrained: str | None = None
    lines: dict[str, int] = field(default_factory=dict)
    text: str = ""  # the YAML as read (the manifest keeps it)

    @property
    def folder(self) -> Path:
        """Where the recipe's relative path parameters are read from (the working directory for text)."""
        return Path(self.source).parent

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed, "steps": [s.describe() for s in self.steps]}

    def hash(self) -> str:
        """Hash of what the recipe does (comments and formatting do not change it)."""
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True, default=str).encode()).hexdigest()

    def all_steps(self) -> list[Step]:
        out: list[Step] = []

        def walk(items):
            for s in items:
                if isinstance(s, SetOp):
                    for b in s.branches:
                        walk(b)
                else:
                    out.append(s)

        walk(self.steps)
        return out


class _RecipeLoader(yaml.SafeLoader):
    """yaml's SafeLoader with YAML 1.2 booleans: only true/false (any case) are booleans.

    Under YAML 1.1 a bare ``on``/``off``/``yes``/``no`` is a boolean, so the original design's own
    ``dedup: {on: image}`` would arrive as the key True. Recipes are written by people who expect
    the 1.2 reading, so those words stay strings here.
    """


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


class _Ctx:
    def __init__(self, source: str, loader: yaml.SafeLoader):
        self.source = source
        self.loader = loader

    def err(self, node: yaml.Node, fieldname: str, msg: str) -> CurateError:
        return CurateError(f"{self.source}:{node.start_mark.line + 1}: {fieldname}: {msg}")

    def value(self, node: yaml.Node) -> Any:
        return self.loader.construct_object(node, deep=True)

    def mapping(self, node: yaml.Node, fieldname: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.err(node, fieldname, f"expected a mapping, got {_kind(node)}")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for k, v in node.value:
            key = self.value(k)
            if not isinstance(key, str):
                raise self.err(k, fieldname, f"keys must be strings, got {_short(key)}")
            if key in out:
                raise self.err(k, f"{fieldname}.{key}" if fieldname else key, "duplicate key")
            out[key] = (k, v)
        return out


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 3


def _short(value: Any) -> str:
    """repr() bounded in size: a YAML alias bomb (10**9 leaves in 500 bytes) must not be spelled out."""
    return _REPR.repr(value)


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return f"{node.value!r}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_type(value: Any, tp: Any) -> tuple[bool, Any]:
    """Is `value` (from YAML) acceptable for annotation `tp`? Returns (ok, converted value)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _check_type(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is Literal:
        return value in typing.get_args(tp), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        return isinstance(value, (int, float)), float(value) if isinstance(value, (int, float)) else value
    if tp is str:
        return isinstance(value, str), value
    if origin in (list, tuple):
        if not isinstance(value, list):
            return False, value
        (arg, *_) = typing.get_args(tp) or (Any,)
        conv = []
        for x in value:
            ok, v = _check_type(x, arg)
            if not ok:
                return False, value
            conv.append(v)
        return True, tuple(conv) if origin is tuple else conv
    return isinstance(value, tp), value


def build_params(cls: type, mapping_node: yaml.Node | None, ctx: _Ctx, where: str) -> Any:
    """YAML mapping -> the filter's Params dataclass, with line-precise errors."""
    Params = cls.Params
    hints = typing.get_type_hints(Params)
    fields = {f.name: f for f in dataclasses.fields(Params)}
    given: dict[str, Any] = {}
    nodes: dict[str, yaml.Node] = {}
    if mapping_node is not None and not (isinstance(mapping_node, yaml.ScalarNode) and ctx.value(mapping_node) is None):
        for key, (knode, vnode) in ctx.mapping(mapping_node, where).items():
            if key not in fields:
                raise ctx.err(knode, f"{where}.{key}",
                              f"unknown parameter of {cls.name!r}; known: {', '.join(sorted(fields)) or '(none)'}")
            value = ctx.value(vnode)
            ok, conv = _check_type(value, hints[key])
            if not ok:
                raise ctx.err(vnode, f"{where}.{key}", f"expected {_type_name(hints[key])}, got {_short(value)}")
            meta = fields[key].metadata
            if conv is not None and isinstance(conv, (int, float)) and not isinstance(conv, bool):
                if "min" in meta and conv < meta["min"]:
                    raise ctx.err(vnode, f"{where}.{key}", f"{conv} is below the minimum {meta['min']}")
                if "max" in meta and conv > meta["max"]:
                    raise ctx.err(vnode, f"{where}.{key}", f"{conv} is above the maximum {meta['max']}")
                if "gt" in meta and not conv > meta["gt"]:
                    raise ctx.err(vnode, f"{where}.{key}", f"{conv} must be greater than {meta['gt']}")
            given[key] = conv
            nodes[key] = vnode
    missing = [n for n, f in fields.items() if n not in given
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    anchor = mapping_node if mapping_node is not None else None
    if missing:
        raise CurateError(f"{ctx.source}:{(anchor.start_mark.line + 1) if anchor else '?'}: {where}: "
                          f"missing required parameter(s) {', '.join(missing)}")
    params = Params(**given)
    check = getattr(params, "check", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            msg = str(e)
            fname, _, text = msg.partition(": ")
            node = nodes.get(fname, anchor)
            line = node.start_mark.line + 1 if node is not None else "?"
            raise CurateError(f"{ctx.source}:{line}: {where}.{fname if text else ''}: {text or msg}") from None
    return params


def _parse_steps(node: yaml.Node, ctx: _Ctx, where: str, prefix: str, registry: dict,
                 allow_empty: bool = False) -> list[Step | SetOp]:
    if not isinstance(node, yaml.SequenceNode):
        raise ctx.err(node, where, f"expected a list of steps, got {_kind(node)}")
    if not node.value and not allow_empty:
        raise ctx.err(node, where, "needs at least one step")
    out: list[Step | SetOp] = []
    for i, item in enumerate(node.value):
        w = f"{where}[{i}]"
        path = f"{prefix}{i}"
        entries = ctx.mapping(item, w)
        if len(entries) != 1:
            raise ctx.err(item, w, f"each step is a mapping with exactly one key (the filter name), got {sorted(entries)}")
        (name, (knode, vnode)), = entries.items()
        if name in SET_OPS:
            if not isinstance(vnode, yaml.SequenceNode) or len(vnode.value) < 2:
                raise ctx.err(vnode, f"{w}.{name}", "expected a list of at least two sub-recipes (each a list of steps)")
            branches = [
                _parse_steps(b, ctx, f"{w}.{name}[{j}]", f"{path}.{j}.", registry) for j, b in enumerate(vnode.value)
            ]
            out.append(SetOp(name, branches, path, knode.start_mark.line + 1))
            continue
        if name not in registry:
            raise ctx.err(knode, w, f"unknown step {name!r}; known: {', '.join(sorted(registry) + list(SET_OPS))}")
        cls = registry[name]
        params = build_params(cls, vnode, ctx, f"{w}.{name}")
        lines = ({ctx.value(k): v.start_mark.line + 1 for k, v in vnode.value}
                 if isinstance(vnode, yaml.MappingNode) else {})
        base = Path(ctx.source).parent
        paths = {f: str(resolve_path(getattr(params, f), base)) for f in path_fields(cls.Params)
                 if getattr(params, f) is not None}
        out.append(Step(name, params, cls, path, knode.start_mark.line + 1, param_lines=lines, paths=paths))
    return out


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Parse and validate recipe text (no pool access); raise CurateError naming file:line: field."""
    try:
        return _parse_recipe(text, source)
    except yaml.MarkedYAMLError as e:  # e.g. a !!python/... tag refused by the SafeLoader
        mark = e.problem_mark or e.context_mark
        raise CurateError(f"{source}:{mark.line + 1 if mark else '?'}: {e.problem or e}") from None
    except yaml.YAMLError as e:  # e.g. a NUL or other control character: the reader's error has no mark
        raise CurateError(f"{source}: not valid YAML: {e}") from None


def _parse_recipe(text: str, source: str) -> Recipe:
    registry = load_filters()
    loader = _RecipeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else "?"
        raise CurateError(f"{source}:{line}: not valid YAML: {e.problem or e}") from None
    except yaml.YAMLError as e:
        raise CurateError(f"{source}: not valid YAML: {e}") from None
    finally:
        loader.dispose()
    if root is None:
        raise CurateError(f"{source}:1: the recipe is empty")
    ctx = _Ctx(source, loader)
    top = ctx.mapping(root, "")
    for key, (knode, _) in top.items():
        if key not in TOP_KEYS:
            raise ctx.err(knode, key, f"unknown key; a recipe has {', '.join(TOP_KEYS)}")
    for req in ("name", "steps"):
        if req not in top:
            raise CurateError(f"{source}:{root.start_mark.line + 1}: {req}: missing required key")
    vals: dict[str, Any] = {}
    for key, tp in (("name", str), ("pool", str), ("seed", int), ("model", str), ("pretrained", str)):
        if key in top:
            node = top[key][1]
            v = ctx.value(node)
            ok, v = _check_type(v, tp | None if key != "name" else tp)
            if not ok:
                raise ctx.err(node, key, f"expected {tp.__name__}, got {_short(ctx.value(node))}")
            vals[key] = v
    if not vals["name"] or "/" in vals["name"]:
        raise ctx.err(top["name"][1], "name", "must be a non-empty name without '/'")
    steps = _parse_steps(top["steps"][1], ctx, "steps", "", registry, allow_empty=True)
    return Recipe(name=vals["name"], steps=steps, source=source, pool=vals.get("pool"), seed=vals.get("seed") or 0,
                  model=vals.get("model"), pretrained=vals.get("pretrained"), text=text)


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CurateError(f"{p}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CurateError(f"{p}: cannot read recipe ({e})") from None
    r = parse_recipe(text, str(p))
    if r.pool and not Path(r.pool).is_absolute():
        # A relative pool path means relative to where the user runs the command, like any CLI path.
        r.pool = str(Path(r.pool))
    return r


def check_paths(recipe: Recipe) -> None:
    """Every path parameter names something that exists; else ``FILE:LINE: steps ID: FIELD: ...``.

    Run before any work (the filter stage calls it with `resolve_models`), so a typo in a target set
    costs no step time. Not part of `parse_recipe`, which checks the recipe alone: the shipped recipes
    name target sets (``evalsets/imagenet/train``) that exist only next to a user's copy.
    """
    for step in recipe.all_steps():
        for name, resolved in step.paths.items():
            value = getattr(step.params, name)
            line = step.param_lines.get(name, step.line)
            if not value.strip():
                raise CurateError(f"{recipe.source}:{line}: steps {step.id}: {name}: empty path")
            if not Path(resolved).exists():
                raise CurateError(f"{recipe.source}:{line}: steps {step.id}: {name}: {value}: no such file or folder "
                                  f"(looked for {resolved}; a relative path is read from the recipe's folder)")


def available_embeddings(pool) -> list[str]:
    """Model ids with embeddings in `pool` (a folder or a `curate.pool.pool.Pool`)."""
    from curate.pool.pool import Pool

    return Pool.open(pool).models()


def resolve_step_model(step: Step, recipe: Recipe, pool, have: list[str], pretrained: dict[str, str]) -> StepModel:
    """The model `step` reads: its own ``model``/``pretrained`` params, else the recipe's, else the command
    line's ``--pretrained [ARCH=]VALUE``; raises CurateError (file:line) when the pool lacks its embeddings.

    With weights known the id is exact (`curate.clip.models.model_id`); without them the pool's single
    embeddings folder for that architecture is used (several are ambiguous, none is missing embeddings:
    both are errors). Without any architecture the pool's only embeddings folder is used. The one place
    that decides this: the engine reads the result from ``Step.model``. `have`: the pool's model ids.
    """
    from curate.clip.models import model_id

    arch = getattr(step.params, "model", None) or recipe.model
    weights = getattr(step.params, "pretrained", None) or recipe.pretrained
    if arch and not weights:
        weights = pretrained.get(arch) or pretrained.get("")
    where = f"{recipe.source}:{step.line}: steps {step.id}"
    emb_dir = Path(pool) / "embeddings"
    if not arch:
        if len(have) == 1:
            return StepModel(have[0].split("__")[0], weights, have[0])
        raise CurateError(f"{where}: model: step {step.name!r} reads embeddings but names no model, and "
                          f"{emb_dir} has {len(have)} models ({', '.join(have) or 'none'})")
    if weights:
        if ("/" in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors"))) and not Path(weights).is_file():
            raise CurateError(f"{where}: pretrained: checkpoint {weights} not found")
        mid = model_id(arch, weights)
        if mid not in have:
            raise CurateError(
                f"{where}: model: no embeddings for {mid} in {emb_dir} "
                f"(have: {', '.join(have) or 'none'}); run `curate embed --model {arch} --pretrained {weights}` first")
        return StepModel(arch, weights, mid)
    matches = [h for h in have if h.startswith(f"{arch}__")]
    if len(matches) != 1:
        raise CurateError(
            f"{where}: model: {'no' if not matches else 'ambiguous'} embeddings for architecture {arch} in "
            f"{emb_dir} (have: {', '.join(have) or 'none'}); "
            + ("run `curate embed` first" if not matches else "set pretrained: in the recipe or --pretrained"))
    return StepModel(arch, None, matches[0])


def resolve_models(recipe: Recipe, pool, pretrained: dict[str, str] | None = None) -> None:
    """Set ``Step.model`` (`resolve_step_model`, once per step) of every step that reads embeddings.

    A step that names weights nowhere but gets them from the recipe or the command line records them
    in its params (``pretrained``), so its description, and with it the step's cache key, names them.
    """
    pretrained = pretrained or {}
    have = available_embeddings(pool)
    for step in recipe.all_steps():
        if not step.needs_model():
            continue
        step.model = resolve_step_model(step, recipe, pool, have, pretrained)
        named_arch = getattr(step.params, "model", None) or recipe.model
        if named_arch and step.model.weights and hasattr(step.params, "pretrained") and not step.params.pretrained:
            step.params = dataclasses.replace(step.params, pretrained=step.model.weights)
