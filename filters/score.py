"""``score``: keep rows whose named score column passes a threshold or is in the top fraction.

``clip_score`` always reads the embedding cosine ``clip_score``. A scorer that is not a cosine, such as the
image-text matching head of `curate train-scorer --variant itm` (``itm_score``: the probability that the pair
matches, docs/FORMATS.md "Scores"), writes its own column in an embeddings folder of its own, and this filter
selects it by name:

    - score: {model: curate-tiny-itm, column: itm_score, keep_top_fraction: 0.3}

The selection rules are clip_score's exactly (`top_fraction_keep`: ``floor(N * fraction)`` rows by score
descending then uid ascending, or DataComp's tie rule with ``datacomp_ties: true``); rows without a score are
dropped with reason ``no <column>``. ``column: clip_score`` makes it the clip_score filter. The threshold
range is not bounded: a column's meaning decides its range (a probability is in [0, 1], a cosine in [-1, 1]).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pyarrow as pa

from filters.base import Batch, Filter, StepResult, register
from filters.clip_score import select_by_score
from filters.common import EmbeddingParams, column

# The documented score columns (docs/FORMATS.md "Embeddings", "Scores"). The class declares them all (the
# superset, which also tells the recipe loader that this step reads an embeddings folder); an instance reads
# only its `column`.
SCORE_COLUMNS = ("clip_score", "itm_score", "match_score")


@register
class ScoreFilter(Filter):
    """Keep image-text pairs a scorer rates highly, by a score column named in the recipe."""

    name = "score"
    scope = "pool"
    columns = SCORE_COLUMNS

    @dataclass
    class Params(EmbeddingParams):
        column: str  # the score column to read, e.g. itm_score (model / pretrained select its folder)
        threshold: float | None = None
        keep_top_fraction: float | None = field(default=None, metadata={"gt": 0.0, "max": 1.0})
        datacomp_ties: bool = False

        def check(self) -> None:
            super().check()
            if not re.fullmatch(r"[a-z_][a-z0-9_]*", self.column or ""):
                raise ValueError(f"column: {self.column!r} is not a column name (lower case, digits, _)")
            if self.column in ("uid", "image_emb", "text_emb", "error"):
                raise ValueError(f"column: {self.column!r} is not a score column")
            if (self.threshold is None) == (self.keep_top_fraction is None):
                raise ValueError("threshold: give exactly one of threshold or keep_top_fraction")

    def __init__(self, params):
        super().__init__(params)
        self.columns = (params.column,)  # what this step reads; the runner names a missing column and the folder

    def apply(self, batch: Batch) -> StepResult:
        p = self.params
        if p.column not in batch.table.column_names:
            raise ValueError(f"score: column {p.column!r} is not in the rows this step received")
        return select_by_score(batch, column(batch.table, p.column).cast(pa.float64()), p, p.column, f" by {p.column}")
