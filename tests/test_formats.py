"""docs/FORMATS.md is true: its schema blocks equal, both ways, what a real small run writes.

One module-scoped run goes through every stage on a tiny served pool: `curate download` (real HTTP through
img2dataset), embed (a random curate-debug checkpoint), filter (a recipe with two clip_score steps and a
knowledge step, so numbered score columns and text_augmented exist), reshard (also a second time with a uid the
pool lacks and a sample whose image is gone, for missing_uids.parquet and stats errors), train (scale debug),
evaluate (two tiny task folders, one with a corrupt image), submit; plus a DataComp import filtered with its
precomputed scores (face_bboxes). Every file those stages wrote is compared with the block for its path pattern:
no column or key the doc lacks, none the doc has that the file lacks, same types; every optional or pattern
entry must occur in some file, so the doc cannot keep a column no code writes.

The rest keeps the document itself honest: the section names that code messages cite exist, the Recipe
table lists every filter's Params, and no file points users at the design notes they do not have.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "FORMATS.md"
SECTIONS = ("uid", "Pools", "sizes.json", "Pool metadata", "Embeddings", "Recipe", "Subset", "Resharded subset",
            "Training runs", "Evaluation results", "Submission bundle")
JSON_TYPES = ("string", "integer", "number", "boolean", "null", "object", "array")
ARCH = "curate-debug"
# scored: classification with a corrupt image, one with groups, retrieval; absent (missing); unscored (skipped)
EVAL_TASKS = ["vtab/svhn", "wilds/fmow", "offline/tuxpaint_retrieval", "offline/digits", "fairness/fairface"]
CAPTIONS = ["salmon sashimi on a plate", "a red dog", "a blue cat on the grass", "a tabby cat", "two geese",
            "a small house", "a big tree", "a boat on a river"]


# ------------------------------------------------------------------------------------------ the document


@dataclass
class Entry:
    """One line of a schema block: a column or a JSON key (with the keys below it, for JSON)."""

    name: str
    type: str
    optional: bool
    line: int
    children: list["Entry"] = field(default_factory=list)

    @property
    def is_pattern(self) -> bool:
        return "<" in self.name


@dataclass
class Block:
    file: str
    line: int
    entries: list[Entry]
    kv: list[str]

    @property
    def is_parquet(self) -> bool:
        return self.file.endswith(".parquet")


def parse_blocks(text: str) -> dict[str, Block]:
    """Every ```schema block of the document by its `file:` pattern (a pattern given twice is an error)."""
    blocks: dict[str, Block] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```schema":
            i += 1
            continue
        start = i + 1
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append((i + 1, lines[i]))
            i += 1
        assert body and body[0][1].startswith("file: "), f"FORMATS.md:{start}: a schema block starts with 'file: '"
        pattern = body[0][1][len("file: "):].strip()
        assert pattern not in blocks, f"FORMATS.md:{start}: a second block for {pattern}"
        entries: list[Entry] = []
        kv: list[str] = []
        stack: list[tuple[int, list[Entry]]] = [(-1, entries)]
        for no, raw in body[1:]:
            if raw.startswith("[kv] "):
                kv.append(raw[5:].strip())
                continue
            indent = len(raw) - len(raw.lstrip(" "))
            m = re.fullmatch(r"(\S+?)(\?)?: (\S+)", raw.strip())
            assert m and indent % 2 == 0, f"FORMATS.md:{no}: expected 'name: type' or 'name?: type', got {raw!r}"
            while indent <= stack[-1][0]:
                stack.pop()
            assert indent == stack[-1][0] + 2 or (indent == 0 and len(stack) == 1), \
                f"FORMATS.md:{no}: indented by {indent} under a line indented by {stack[-1][0]}"
            e = Entry(m.group(1), m.group(3), bool(m.group(2)), no)
            stack[-1][1].append(e)
            stack.append((indent, e.children))
        blocks[pattern] = Block(pattern, start, entries, kv)
    return blocks


DOC_TEXT = DOC.read_text(encoding="utf-8")
BLOCKS = parse_blocks(DOC_TEXT)


def _filter_names() -> list[str]:
    from curate.filter.recipe import load_filters

    return sorted(load_filters(), key=len, reverse=True)


def name_regex(name: str) -> re.Pattern:
    """`<filter>` = a registered filter, `<path>` = a step position (0, 2_0_1), any other `<...>` = any name."""
    parts = re.split(r"(<[^>]+>)", name)
    out = []
    for p in parts:
        if p == "<filter>":
            out.append("(?:" + "|".join(map(re.escape, _filter_names())) + ")")
        elif p == "<path>":
            out.append(r"\d+(?:_\d+)*")
        elif p.startswith("<") and p.endswith(">"):
            out.append(".+")
        else:
            out.append(re.escape(p))
    return re.compile("".join(out))


def arrow_type(t: pa.DataType) -> str:
    """pyarrow's spelling of a type, normalised as FORMATS.md says (no item names; float16/32/64)."""
    s = re.sub(r"\b(element|item): ", "", str(t))
    s = re.sub(r"\bhalffloat\b", "float16", s)
    s = re.sub(r"\bfloat\b", "float32", s)
    return re.sub(r"\bdouble\b", "float64", s)


def arrow_type_matches(doc: str, real: str) -> bool:
    return re.fullmatch(re.escape(doc).replace(re.escape("[d]"), r"\[\d+\]"), real) is not None


def json_type_ok(value: Any, spec: str) -> bool:
    for alt in spec.split("|"):
        m = re.fullmatch(r"array<(\w+)>", alt)
        if m:
            if isinstance(value, list) and all(json_type_ok(v, m.group(1)) for v in value):
                return True
            continue
        assert alt in JSON_TYPES, f"unknown JSON type {alt!r} in {spec!r}"
        if (alt == "string" and isinstance(value, str)
                or alt == "integer" and isinstance(value, int) and not isinstance(value, bool)
                or alt == "number" and isinstance(value, (int, float)) and not isinstance(value, bool)
                or alt == "boolean" and isinstance(value, bool)
                or alt == "null" and value is None
                or alt == "object" and isinstance(value, dict)
                or alt == "array" and isinstance(value, list)):
            return True
    return False


# ------------------------------------------------------------------------------------------ comparison


class Checker:
    """Compares files with blocks, collecting problems per block and which entries some file used."""

    def __init__(self) -> None:
        self.problems: dict[str, list[str]] = {p: [] for p in BLOCKS}
        self.seen: set[tuple[str, int]] = set()  # (pattern, entry line)
        self.instances: dict[str, int] = {p: 0 for p in BLOCKS}

    def _match(self, entries: list[Entry], name: str) -> Entry | None:
        for e in entries:
            if not e.is_pattern and e.name == name:
                return e
        for e in entries:
            if e.is_pattern and name_regex(e.name).fullmatch(name):
                return e
        return None

    def parquet(self, pattern: str, path: Path) -> None:
        block = BLOCKS[pattern]
        out = self.problems[pattern]
        self.instances[pattern] += 1
        schema = pq.read_schema(path)
        order = []
        for f in schema:
            e = self._match(block.entries, f.name)
            if e is None:
                out.append(f"{path}: column {f.name!r} ({arrow_type(f.type)}) is not documented")
                continue
            self.seen.add((pattern, e.line))
            if not arrow_type_matches(e.type, arrow_type(f.type)):
                out.append(f"{path}: column {f.name!r} is {arrow_type(f.type)}, documented as {e.type}")
            if not e.is_pattern:
                order.append(e.line)
        for e in block.entries:
            if not e.is_pattern and not e.optional and e.name not in schema.names:
                out.append(f"{path}: documented column {e.name!r} is not in the file")
        if order != sorted(order):
            out.append(f"{path}: columns are in another order than documented: {schema.names}")
        kv = {k.decode() for k in (schema.metadata or {})} - {"ARROW:schema", "pandas"}
        if kv != set(block.kv):
            out.append(f"{path}: key-value metadata {sorted(kv)}, documented {sorted(block.kv)}")

    def json(self, pattern: str, value: Any, where: str) -> None:
        self.instances[pattern] += 1
        self._object(pattern, BLOCKS[pattern].entries, value, where)

    def _object(self, pattern: str, entries: list[Entry], value: Any, where: str) -> None:
        out = self.problems[pattern]
        if not isinstance(value, dict):
            out.append(f"{where}: expected an object, got {type(value).__name__}")
            return
        for k, v in value.items():
            e = self._match(entries, k)
            if e is None:
                out.append(f"{where}: key {k!r} is not documented")
                continue
            self.seen.add((pattern, e.line))
            if not json_type_ok(v, e.type):
                out.append(f"{where}.{k}: {v!r:.80} is not {e.type}")
            elif e.children and isinstance(v, dict):
                self._object(pattern, e.children, v, f"{where}.{k}")
            elif e.children and isinstance(v, list):
                for i, item in enumerate(v):
                    self._object(pattern, e.children, item, f"{where}.{k}[{i}]")
        for e in entries:
            if not e.is_pattern and not e.optional and e.name not in value:
                out.append(f"{where}: documented key {e.name!r} is absent")

    def unused(self) -> list[str]:
        """Entries no file exercised: optional or pattern names anywhere, and any entry below an array or a
        pattern key (required top-level entries are checked by presence already)."""
        missing = []

        def walk(pattern: str, entries: list[Entry], inside: bool) -> None:
            for e in entries:
                if (e.optional or e.is_pattern or inside) and (pattern, e.line) not in self.seen:
                    missing.append(f"FORMATS.md:{e.line}: {pattern}: {e.name} never occurred in the run's files")
                walk(pattern, e.children, inside or e.type.startswith("array") or e.is_pattern or e.optional)

        for pattern, block in BLOCKS.items():
            walk(pattern, block.entries, False)
        return missing


# ------------------------------------------------------------------------------------------ the real run


def _png(seed: int, w: int = 48, h: int = 40) -> bytes:
    from PIL import Image

    a = (np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _have_wordnet() -> bool:
    from curate.lib import wordnet

    return Path(wordnet.wordnet_source_dir(), "data.noun").is_file()


def _write_evalsets(root: Path) -> Path:
    from benchmark import evalsets as E
    from benchmark.tasks import TASKS

    ev = root / "evalsets"
    cls = [{"__key__": f"{i:04d}", "png": _png(100 + i, 20, 20), "cls": str(i % 2)} for i in range(4)]
    cls.insert(2, {"__key__": "corrupt", "png": b"\x89PNG\r\n\x1a\ngarbage", "cls": "0"})
    E.write_evalset(ev / TASKS["vtab/svhn"].folder, cls, ["0", "1"], ["the number {c}."])
    # FMoW-like: per-sample metadata [region, year, y] gives the worst-region groups
    meta = []
    for i in range(12):
        buf = io.BytesIO()
        np.save(buf, np.array([i % 6, 2016, i % 2], dtype=np.int64))
        meta.append({"__key__": f"{i:04d}", "png": _png(300 + i, 20, 20), "cls": str(i % 2), "npy": buf.getvalue()})
    E.write_evalset(ev / TASKS["wilds/fmow"].folder, meta, ["red", "green"], ["a {c} square."])
    ret = [{"__key__": f"{i:04d}", "png": _png(200 + i, 20, 20), "txt": f"caption {i}"} for i in range(4)]
    E.write_evalset(ev / TASKS["offline/tuxpaint_retrieval"].folder, ret, None, None, dataset_type=E.RETRIEVAL)
    return ev


def _drop_one_image(pool: Path, copy: Path) -> None:
    """A copy of `pool` whose last shard lost one sample's image (what bit rot leaves): a reshard error."""
    shutil.copytree(pool, copy)
    tar = sorted((copy / "shards").glob("*.tar"))[-1]
    with tarfile.open(tar) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    victim = next(m.name for m, _ in members if m.name.endswith(".jpg"))
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            if m.name != victim:
                tf.addfile(m, io.BytesIO(data))
    # keep the metadata's record of the tar size true, so the copy is still a finished pool
    meta = copy / "metadata" / f"{tar.stem}.parquet"
    t = pq.read_table(meta)
    md = dict(t.schema.metadata or {})
    md[b"curate.tar_bytes"] = str(tar.stat().st_size).encode()
    pq.write_table(t.replace_schema_metadata(md), meta)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """Every stage once on a tiny pool; returns the stage folders."""
    from benchmark.evaluate import EvalConfig, evaluate
    from benchmark.submit import SubmitConfig, submit
    from benchmark.train import TrainConfig, train
    from curate.core import uids as uidlib
    from curate.embed.stage import EmbedConfig, embed
    from curate.filter.engine import FilterConfig, filter_pool
    from curate.pool.datacomp import ImportConfig, import_datacomp
    from curate.pool.download import DownloadConfig, download
    from curate.pool.serve import running_server
    from curate.reshard.stage import ReshardConfig, reshard
    from tests.datacomp_factory import write_datacomp_pool
    from tests.run_factory import random_checkpoint

    root = tmp_path_factory.mktemp("formats")
    www = root / "www"
    www.mkdir()
    for i in range(len(CAPTIONS)):
        (www / f"img{i}.png").write_bytes(_png(i))
    (www / "notimage.jpg").write_bytes(b"<html>not an image</html>\n")
    with running_server(root, port=0) as base:
        rows = [(f"{base}/img{i}.png", c) for i, c in enumerate(CAPTIONS)]
        rows += [(f"{base}/missing.png", "a 404"), (f"{base}/notimage.jpg", "not an image"),
                 ("ftp://example.com/a.png", "not http")]
        urls = root / "urls.parquet"
        pq.write_table(pa.table({"url": [u for u, _ in rows], "text": [t for _, t in rows]}), urls)
        download(DownloadConfig(urls=urls, out=root / "pool", distributor="multiprocessing", processes=1, threads=4,
                                timeout=5.0, shard_size=6, image_size=32, progress=False, echo=False,
                                allow_loopback=True))  # the test server is on 127.0.0.1
    pool = root / "pool"

    ckpt = random_checkpoint(root / "model.pt", 0, ARCH)
    emb = embed(EmbedConfig(pool=pool, model=ARCH, pretrained=str(ckpt), batch_size=8, decode="inline", progress=False))
    _write_itm_scores(pool, emb["model_id"], root / "scores_pool")

    steps = "  - clip_score: {threshold: -1.0}\n  - clip_score: {keep_top_fraction: 0.9}\n"
    if _have_wordnet():
        steps += "  - knowledge: {rare_below: 100}\n"
    recipe = root / "formats.yaml"
    recipe.write_text(f"name: formats\nmodel: {ARCH}\npretrained: {ckpt}\nsteps:\n{steps}")
    subset = root / "subset"
    filter_pool(FilterConfig(recipe=str(recipe), pool=str(pool), out=str(subset), progress=False, workers=1))
    reshard(ReshardConfig(subset=subset, shard_size=4, workers=1, progress=False))

    # a subset listing a uid the pool lacks, resharded from a pool copy with one image gone
    odd = root / "odd_subset"
    odd.mkdir()
    ok = pq.read_table(pool / "metadata", columns=["uid", "status"]).to_pylist()
    uidlib.save(odd / "uids.npy", [r["uid"] for r in ok if r["status"] == "success"] + ["f" * 32])
    _drop_one_image(pool, root / "pool_damaged")
    reshard(ReshardConfig(subset=odd, pool=root / "pool_damaged", shard_size=4, workers=1, progress=False))

    run_dir = root / "run"
    train(TrainConfig(data=subset, scale="debug", out=run_dir, workers=0, progress=False))  # no loader process
    evaluate(EvalConfig(run=run_dir, evalsets=_write_evalsets(root), tasks=EVAL_TASKS,
                        num_workers=0, progress=False))
    submit(SubmitConfig(run=run_dir))

    write_datacomp_pool(root / "dc_source", n_rows=20, n_files=2, dims={"b32": 4, "l14": 4}, face_rate=0.5)
    import_datacomp(ImportConfig(metadata_dir=root / "dc_source", out=root / "dc_pool"))
    dc_recipe = root / "dc.yaml"
    dc_recipe.write_text("name: dc\nsteps:\n"
                         "  - clip_score: {model: ViT-B-32, pretrained: openai, keep_top_fraction: 0.5}\n")
    filter_pool(FilterConfig(recipe=str(dc_recipe), pool=str(root / "dc_pool"), out=str(root / "dc_subset"),
                             progress=False, workers=1, report=False))
    return {"root": root, "pool": pool, "subsets": [subset, root / "dc_subset"], "reshards": [subset, odd],
            "run": run_dir, "bundle": run_dir / "submission", "dc_source": root / "dc_source",
            "dc_pool": root / "dc_pool"}


def _write_itm_scores(pool: Path, model_id: str, dest: Path) -> None:
    """A scores folder (`curate train-scorer --variant itm`'s form) from an untrained head, in another pool folder
    so the embeddings block only sees embeddings."""
    import torch

    from curate.run import itm

    files, uids, img, txt = itm.load_embeddings(pool, model_id)
    torch.manual_seed(0)
    head = itm.make_head(img.shape[1], 8).state_dict()
    from curate.run.matcher import MATCH_COLUMN

    cos = np.einsum("ij,ij->i", img, txt) / np.maximum(np.linalg.norm(img, axis=1) * np.linalg.norm(txt, axis=1), 1e-9)
    itm.write_scores(dest, f"{ARCH}-itm__000000000000", files, uids,
                     {itm.SCORE_COLUMN: itm.score(head, img.shape[1], 8, img, txt), MATCH_COLUMN: cos},
                     {"curate.embeddings_model_id": model_id, "curate.scorer": "head.pt"})


def _tar_jsons(tars: list[Path]) -> list[tuple[str, Any]]:
    out = []
    for t in tars:
        with tarfile.open(t) as tf:
            for m in tf:
                if m.name.endswith(".json"):
                    out.append((f"{t}:{m.name}", json.loads(tf.extractfile(m).read())))
    return out


def _jsonl(path: Path) -> list[tuple[str, Any]]:
    return [(f"{path}:{i}", json.loads(line)) for i, line in enumerate(path.read_text().splitlines(), 1) if line]


def _load(path: Path) -> list[tuple[str, Any]]:
    return [(str(path), json.loads(path.read_text()))]


def _items(run: dict, *kinds: str) -> list[Path]:
    """Per-item files of the given task kinds (their `curate.items` metadata says which)."""
    out = []
    for p in sorted((run["run"] / "eval_results.items").glob("*.parquet")):
        if json.loads(pq.read_schema(p).metadata[b"curate.items"])["kind"] in kinds:
            out.append(p)
    return out


# pattern -> function(run) returning the parquet paths, or [(where, JSON value)], a run wrote for it
FILES: dict[str, Callable[[dict], list]] = {
    "POOL/metadata/<shard>.parquet": lambda r: sorted((r["pool"] / "metadata").glob("*.parquet")),
    "POOL/shards/<shard>.tar/<key>.json": lambda r: _tar_jsons(sorted((r["pool"] / "shards").glob("*.tar"))),
    "POOL/pool.json": lambda r: _load(r["pool"] / "pool.json"),
    "POOL/shards/sizes.json": lambda r: _load(r["pool"] / "shards" / "sizes.json"),
    "METADATA_DIR/<stem>.parquet": lambda r: sorted(r["dc_source"].glob("*.parquet")),
    "POOL/embeddings/<model-id>/_datacomp_index.parquet":
        lambda r: sorted((r["dc_pool"] / "embeddings").glob("*/_datacomp_index.parquet")),
    "POOL/datacomp.json": lambda r: _load(r["dc_pool"] / "datacomp.json"),
    "POOL/embeddings/<model-id>/<shard>.parquet": lambda r: sorted((r["pool"] / "embeddings").glob("*/0*.parquet")),
    "POOL/embeddings/<scores-id>/<shard>.parquet":
        lambda r: sorted((r["root"] / "scores_pool" / "embeddings").glob("*/0*.parquet")),
    "SUBSET/subset.parquet": lambda r: [s / "subset.parquet" for s in r["subsets"]],
    "SUBSET/decisions.parquet": lambda r: [s / "decisions.parquet" for s in r["subsets"]],
    "SUBSET/manifest.json": lambda r: [x for s in r["subsets"] for x in _load(s / "manifest.json")],
    "SUBSET/shards/<shard>.tar/<key>.json":
        lambda r: _tar_jsons([t for s in r["reshards"] for t in sorted((s / "shards").glob("*.tar"))]),
    "SUBSET/shards/sizes.json": lambda r: [x for s in r["reshards"] for x in _load(s / "shards" / "sizes.json")],
    "SUBSET/shards/meta.json": lambda r: [x for s in r["reshards"] for x in _load(s / "shards" / "meta.json")],
    "SUBSET/shards/<shard>.stats.json":
        lambda r: [x for s in r["reshards"] for p in sorted((s / "shards").glob("*.stats.json")) for x in _load(p)],
    "SUBSET/shards/missing_uids.parquet": lambda r: sorted(s / "shards" / "missing_uids.parquet" for s in r["reshards"]
                                                           if (s / "shards" / "missing_uids.parquet").exists()),
    "RUN/info.json": lambda r: _load(r["run"] / "info.json"),
    "RUN/log.jsonl": lambda r: _jsonl(r["run"] / "log.jsonl"),
    "RUN/eval_results.jsonl": lambda r: _jsonl(r["run"] / "eval_results.jsonl"),
    "RUN/eval_summary.json": lambda r: _load(r["run"] / "eval_summary.json"),
    "RUN/eval_results.items/<classification task>.parquet": lambda r: _items(r, "classification", "wilds", "fairness"),
    "RUN/eval_results.items/<retrieval task>.parquet": lambda r: _items(r, "retrieval"),
    "BUNDLE/bundle.json": lambda r: _load(r["bundle"] / "bundle.json"),
    "BUNDLE/versions.json": lambda r: _load(r["bundle"] / "versions.json"),
}


@pytest.fixture(scope="module")
def checked(run) -> Checker:
    c = Checker()
    for pattern in BLOCKS.keys() & FILES.keys():
        for item in FILES[pattern](run):
            if BLOCKS[pattern].is_parquet:
                c.parquet(pattern, item)
            else:
                c.json(pattern, item[1], item[0])
    return c


# ------------------------------------------------------------------------------------------ tests


def test_every_block_is_checked_and_every_checked_file_has_a_block():
    assert sorted(BLOCKS.keys() - FILES.keys()) == [], "documented files this test does not compare"
    assert sorted(FILES.keys() - BLOCKS.keys()) == [], "files the run writes that FORMATS.md has no block for"


@pytest.mark.parametrize("pattern", sorted(BLOCKS))
def test_schema_block_equals_the_files_a_run_writes(checked, pattern):
    assert checked.instances[pattern] > 0, f"the run wrote no file for {pattern}"
    assert checked.problems[pattern] == []


def test_every_optional_and_pattern_entry_occurs(checked):
    unused = checked.unused()
    if not _have_wordnet():  # the knowledge filter (text_augmented) needs wordnet-base (make setup)
        unused = [u for u in unused if not re.search(r": (text_augmented|text_original)\b", u)]
    # written only on CUDA (the GPU's name and CUDA version), and only by a resumed run whose torch threads,
    # device or CPU changed: neither happens in this CPU-only, uninterrupted run
    unused = [u for u in unused if not re.search(r"(reproducibility|trained_with)\.(gpu|cuda)\b|: (gpu|cuda)\b"
                                                   r"|reproducibility_earlier", u)]
    # written only by a run started from other weights (init_checkpoint); tests/benchmark/test_train_init.py
    # checks such an info.json against the same block
    unused = [u for u in unused if not re.search(r"RUN/info\.json: (init_checkpoint\w*|path|sha256) never", u)]
    # written only by `curate evaluate --allow-partial` on an incomplete eval set (this run's sets are complete);
    # tests/reliability/test_eval_integrity.py checks such a line against the same block
    unused = [u for u in unused if not re.search(r"RUN/eval_results\.jsonl: (partial|n_expected) ", u)]
    assert unused == []


def test_checker_catches_an_undocumented_a_stale_and_a_mistyped_column(run):
    """The comparison itself can fail: a doc block with one column renamed and one type changed."""
    saved = BLOCKS["SUBSET/decisions.parquet"]
    bogus = dataclasses.replace(saved, entries=[dataclasses.replace(e) for e in saved.entries])
    bogus.entries[1].name = "stepname"  # `step` undocumented, `stepname` stale
    bogus.entries[2].type = "int64"  # step_index is int32
    BLOCKS["SUBSET/decisions.parquet"] = bogus
    try:
        c = Checker()
        c.parquet("SUBSET/decisions.parquet", run["subsets"][0] / "decisions.parquet")
        problems = " | ".join(c.problems["SUBSET/decisions.parquet"])
    finally:
        BLOCKS["SUBSET/decisions.parquet"] = saved
    assert "column 'step' (string) is not documented" in problems
    assert "documented column 'stepname' is not in the file" in problems
    assert "column 'step_index' is int32, documented as int64" in problems
    c = Checker()
    c.json("BUNDLE/versions.json", {"numpy": 2}, "x")
    c.json("RUN/log.jsonl", {"step": 1}, "y")
    assert c.problems["BUNDLE/versions.json"] == ["x.numpy: 2 is not string"]
    assert "y: documented key 'loss' is absent" in c.problems["RUN/log.jsonl"]


def test_type_spelling():
    assert arrow_type(pa.list_(pa.float16(), 512)) == "fixed_size_list<float16>[512]"
    assert arrow_type_matches("fixed_size_list<float16>[d]", "fixed_size_list<float16>[512]")
    assert not arrow_type_matches("fixed_size_list<float16>[d]", "fixed_size_list<float32>[512]")
    assert arrow_type(pa.list_(pa.list_(pa.float64()))) == "list<list<float64>>"
    assert arrow_type(pa.float32()) == "float32" and arrow_type(pa.bool_()) == "bool"
    assert name_regex("<filter>_<path>").fullmatch("clip_score_2_0_1")
    assert not name_regex("<filter>").fullmatch("text_augmented")


def test_sections_cited_by_code_exist():
    """Every section name that a message or docstring cites after docs/FORMATS.md is a heading of the document."""
    headings = set(re.findall(r"^#{2,3} (.+?)\s*$", DOC_TEXT, flags=re.M))
    assert set(SECTIONS) <= headings
    cited = {}
    for path in _repo_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in re.finditer(r'FORMATS\.md[,:]? ((?:"[^"\n]+"(?:, )?)+)', text):
            for name in re.findall(r'"([^"\n]+)"', m.group(1)):
                cited.setdefault(name, str(path.relative_to(REPO)))
    assert cited, "no citation found: the pattern no longer matches how code cites the document"
    assert {n: p for n, p in cited.items() if n not in headings} == {}


def _recipe_table() -> dict[str, tuple[str, list[str]]]:
    section = DOC_TEXT.split("\n## Recipe\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = (cells[1], re.findall(r"`([^`]+)`", cells[3]))
    return rows


def _yaml_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def test_recipe_table_lists_every_filter_and_its_params():
    from curate.filter.recipe import load_filters

    table = _recipe_table()
    registry = load_filters()
    assert sorted(table) == sorted(registry)
    for name, cls in registry.items():
        want = []
        for f in dataclasses.fields(cls.Params):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            want.append(f.name if required else f"{f.name}: {_yaml_value(f.default)}")
        assert table[name] == (cls.scope, want), name


def _repo_text_files() -> list[Path]:
    """Files git tracks, and new ones it does not ignore, that are text."""
    try:
        names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                               check=True, capture_output=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    out = []
    for n in filter(None, names):
        p = REPO / n
        if p.is_file() and not p.is_symlink() and b"\0" not in p.read_bytes()[:8192]:
            out.append(p)
    return out


def test_no_file_points_users_at_the_design_notes():
    """Users have docs/FORMATS.md, not the project's design notes; perf/RESULTS.md is history and may cite them."""
    needle = "DESIGN" + ".md"  # spelled apart so this file does not match itself
    hits = [p.relative_to(REPO).as_posix() for p in _repo_text_files()
            if needle in p.read_text(encoding="utf-8", errors="replace")]
    hits = [h for h in hits if h != "perf/RESULTS.md"]
    assert hits == []
