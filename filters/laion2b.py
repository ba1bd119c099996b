"""``laion2b``: LAION-2B's rule as DataComp reproduces it: B/32 CLIP score >= 0.28 and an English caption.

DataComp's "LAION-2B filtering" baseline keeps ``clip_b32_similarity_score >= 0.28`` and English by
gcld3. gcld3 needs a C++ build with protobuf and has no maintained wheel for current Pythons, so
English is decided by the same offline fastText lid.176 model as ``basic`` (a documented deviation;
set ``english: false`` to apply the score rule alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow.compute as pc

from filters.base import Batch, Filter, StepResult, register
from filters.common import EmbeddingParams, column, language_gate, language_model


@register
class Laion2bFilter(Filter):
    """CLIP score of a B/32-style model at least 0.28, caption in English."""

    name = "laion2b"
    scope = "row"
    columns = ("text", "clip_score")

    @dataclass
    class Params(EmbeddingParams):
        model: str | None = field(default="ViT-B-32", kw_only=True)  # DataComp's rule is OpenAI B/32's score
        threshold: float = field(default=0.28, metadata={"min": -1.0, "max": 1.0})
        english: bool = True

    def setup(self, context) -> None:
        if self.params.english:
            language_model()

    def apply(self, batch: Batch) -> StepResult:
        p = self.params
        score = column(batch.table, "clip_score")
        s = pc.fill_null(score, float("nan")).to_numpy(zero_copy_only=False).astype(np.float64)
        reason = np.full(len(s), None, dtype=object)
        reason[np.isnan(s)] = "no clip score"
        low = ~np.isnan(s) & (s < p.threshold)
        reason[low] = f"clip score < {p.threshold:g}"
        keep = reason == None  # noqa: E711
        if p.english:
            keep = language_gate(column(batch.table, "text"), keep, reason)
        return StepResult(keep=keep, score=s, reason=reason, threshold=p.threshold)
