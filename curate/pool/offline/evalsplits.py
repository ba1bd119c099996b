"""Held-out evaluation splits: real images that never enter the pool.

  emoji_category      Twemoji image -> one of the emoji categories (a seeded ~25% of base emoji per
                      category, each together with all its skin-tone variants)
  flags_country       country-flag emoji -> country name (a seeded ~30% of the country flags)
  tuxpaint_retrieval  Tux Paint stamp <-> its English caption (a seeded ~20% of the stamps)

Holding out whole groups (an emoji with its skin tones) and then dropping any pool item whose source
bytes equal a held-out item's keeps the test images out of training, even as a duplicate.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass

from curate.pool.offline.sources import SourceItem

TASKS = ("emoji_category", "flags_country", "tuxpaint_retrieval")


@dataclass(frozen=True)
class HoldoutConfig:
    emoji_fraction: float = 0.25
    flags_fraction: float = 0.30
    tuxpaint_fraction: float = 0.20


@dataclass
class EvalItem:
    item: SourceItem
    label: int
    classname: str
    caption: str


@dataclass
class Split:
    pool: list[SourceItem]
    evalsets: dict[str, list[EvalItem]]
    classnames: dict[str, list[str]]
    dropped_as_heldout_duplicate: list[str]   # source ids of pool items equal (bytes) to a held-out item


def _sha(item: SourceItem) -> str:
    return hashlib.sha256(item.path.read_bytes()).hexdigest()


def split_heldout(items: list[SourceItem], cfg: HoldoutConfig, seed: int) -> Split:
    rng = random.Random(f"{seed}:heldout")
    held: dict[str, list[SourceItem]] = {t: [] for t in TASKS}

    # emoji: group by base emoji, stratify by category (flags and their own task excluded)
    groups: dict[str, list[SourceItem]] = defaultdict(list)
    for it in items:
        if it.source == "twemoji":
            groups[it.group].append(it)
    by_cat: dict[str, list[str]] = defaultdict(list)
    flags: list[str] = []
    for g, members in sorted(groups.items()):
        base = members[0]
        if base.subcategory == "country-flag":
            flags.append(g)
        elif base.category != "Flags":
            by_cat[base.category].append(g)
    held_groups: set[str] = set()
    for cat in sorted(by_cat):
        chosen = rng.sample(by_cat[cat], round(cfg.emoji_fraction * len(by_cat[cat])))
        held_groups.update(chosen)
        for g in sorted(chosen):
            held["emoji_category"].extend(groups[g])
    chosen_flags = sorted(rng.sample(flags, round(cfg.flags_fraction * len(flags))))
    held_groups.update(chosen_flags)
    for g in chosen_flags:
        held["flags_country"].extend(groups[g])

    stamps = [it for it in items if it.source == "tuxpaint"]
    held_stamps = set(id(s) for s in rng.sample(stamps, round(cfg.tuxpaint_fraction * len(stamps))))
    held["tuxpaint_retrieval"] = [s for s in stamps if id(s) in held_stamps]

    held_ids = {(it.source, it.source_id) for t in TASKS for it in held[t]}
    held_sha = {_sha(it) for t in TASKS for it in held[t]}
    pool, dropped = [], []
    for it in items:
        if (it.source, it.source_id) in held_ids:
            continue
        if _sha(it) in held_sha:
            dropped.append(f"{it.source}:{it.source_id}")
            continue
        pool.append(it)

    evalsets: dict[str, list[EvalItem]] = {}
    classnames: dict[str, list[str]] = {}
    cats = sorted({it.category for it in held["emoji_category"]})
    classnames["emoji_category"] = cats
    evalsets["emoji_category"] = [EvalItem(it, cats.index(it.category), it.category, it.caption)
                                  for it in sorted(held["emoji_category"], key=lambda i: i.source_id)]
    countries = sorted({it.country for it in held["flags_country"]})
    classnames["flags_country"] = countries
    evalsets["flags_country"] = [EvalItem(it, countries.index(it.country), it.country, it.caption)
                                 for it in sorted(held["flags_country"], key=lambda i: i.source_id)]
    stamps_sorted = sorted(held["tuxpaint_retrieval"], key=lambda i: i.source_id)
    classnames["tuxpaint_retrieval"] = [it.caption for it in stamps_sorted]
    evalsets["tuxpaint_retrieval"] = [EvalItem(it, k, it.caption, it.caption) for k, it in enumerate(stamps_sorted)]
    return Split(pool, evalsets, classnames, dropped)
