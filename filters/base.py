"""The common interface every filter implements.

A filter receives a `Batch` (a pyarrow Table of pool rows plus, when it asks for them, numpy
arrays of embeddings aligned with the rows) and returns a `StepResult`: per row, whether it is
kept, the score it was judged on and the reason it was dropped. Rejected rows are never lost: the
runner writes every (uid, step) decision to the ledger.

Two scopes exist because some DataComp rules are per-row (caption length) and some are pool-wide
(keep the top 30% by CLIP score, deduplicate): a ``scope = "row"`` filter must give the same answer
for a row whatever batch it arrives in, so the runner may split the pool freely; a
``scope = "pool"`` filter receives every row that reached its step in one batch (only the columns
it declares in `columns` / `embeddings`, so memory stays bounded by what it needs).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa


@dataclass
class Batch:
    """Rows of the pool handed to a filter.

    table: at least ``uid`` plus the columns the filter declared.
    image_emb / text_emb: float32 arrays (n, d), L2-normalised, rows aligned with `table`; present
    only when the filter declared them. Rows without embeddings (undecodable images) are NaN.
    context: run-wide read-only facts the runner supplies (e.g. ``evalsets`` path, ``seed``).
    """

    table: pa.Table
    image_emb: np.ndarray | None = None
    text_emb: np.ndarray | None = None
    context: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.table.num_rows


@dataclass
class StepResult:
    """What a filter decided for each row of a batch.

    keep: bool array, True = the row goes on to the next step.
    score: float array the decision was based on (NaN where there is none), or None.
    reason: per-row string explaining a drop (None for kept rows); e.g. "min_words: 2 < 3" or
        "duplicate of 3f2a...".
    threshold: the threshold applied, when the step has one (recorded in the ledger).
    columns: extra per-row output columns (e.g. ``text_augmented``) to carry into the subset.
    """

    keep: np.ndarray
    score: np.ndarray | None = None
    reason: list[str | None] | None = None
    threshold: float | None = None
    columns: dict[str, pa.Array] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.keep = np.asarray(self.keep, dtype=bool)
        n = len(self.keep)
        if self.score is not None:
            self.score = np.asarray(self.score, dtype=np.float64)
            assert len(self.score) == n, "score length must equal keep length"
        if self.reason is None:
            self.reason = [None] * n
        assert len(self.reason) == n, "reason length must equal keep length"
        for name, col in self.columns.items():
            assert len(col) == n, f"column {name} length must equal keep length"


class Filter:
    """Base class. Subclasses set the class attributes and implement `apply`.

    name: the recipe step key (``basic``, ``clip_score`` ...).
    Params: a dataclass of the step's parameters; the recipe validator builds it from YAML and
        rejects unknown keys and wrong types, naming the line.
    scope: "row" or "pool" (see module docstring).
    columns: pool/metadata/embedding-table columns the filter reads (besides ``uid``).
    embeddings: which embedding arrays it needs: subset of {"image", "text"}.
    """

    name: ClassVar[str]
    Params: ClassVar[type]
    scope: ClassVar[Literal["row", "pool"]] = "row"
    columns: ClassVar[tuple[str, ...]] = ()
    embeddings: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Any):
        self.params = params

    def setup(self, context: dict[str, Any]) -> None:
        """Load what the filter needs once per process (language-ID model, WordNet, target embeddings).

        The runner calls it once before `apply`, with a context dict it fills (filters do no I/O of
        their own beyond loading bundled resources):
          ``pool``: pool directory (str); ``seed``: int; ``cache_dir``: str, a writable cache folder;
          ``model_id``: embeddings folder name this step reads (when it uses embeddings);
          ``recipe_dir``: the recipe file's folder; ``paths``: the step's path parameters (Params fields
          with ``metadata={"path": True}``) as the recipe validation resolved and checked them, read
          with `filters.common.param_path`;
          ``embed_image_paths``: callable(list[str]) -> float32 array (n, d) of L2-normalised image
          embeddings computed with the same model as the step's pool embeddings (for target sets
          such as image_based's reference images or decontaminate's evaluation images).
        """

    def apply(self, batch: Batch) -> StepResult:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "params": dataclasses.asdict(self.params)}


REGISTRY: dict[str, type[Filter]] = {}


def register(cls: type[Filter]) -> type[Filter]:
    """Class decorator: make a filter available to recipes under ``cls.name``."""
    if cls.name in REGISTRY:
        raise ValueError(f"filter {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls
