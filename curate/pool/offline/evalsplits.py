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

from curate.pool.offline.concepts import concept_key
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


# ------------------------------------------------------------------ the large pool's suite (v2)

# task -> (type, group). in-domain: concepts held out of every pool source; style-shift: concepts the
# pool has, drawn in styles or icon sets held out of the pool. benchmark/tasks.py gives the reasons.
V2_TASKS: dict[str, tuple[str, str]] = {
    "emoji_heldout": ("classification", "in_domain"),
    "icon_heldout": ("classification", "in_domain"),
    "tuxpaint_heldout": ("retrieval", "in_domain"),
    "openmoji_line": ("retrieval", "style_shift"),
    "fluent_contrast": ("retrieval", "style_shift"),
    "iconset_shift": ("retrieval", "style_shift"),
    "flag_styles": ("classification", "style_shift"),
}
EMOJI_SOURCES = ("twemoji", "noto", "openmoji", "fluent")


def _ck(it: SourceItem) -> str:
    return it.meta["concept"]


def _is_flag(it: SourceItem) -> bool:
    return bool(it.country) or it.subcategory == "country-flag" or "flag" in _ck(it).split()


def _iso(code: str) -> str:
    """Regional-indicator pair ("1F1E9-1F1EA") -> ISO 3166 alpha-2 ("de"), else ""."""
    parts = [p for p in code.upper().split("-") if p and p != "FE0F"]
    if len(parts) != 2 or not all(0x1F1E6 <= int(p, 16) <= 0x1F1FF for p in parts):
        return ""
    return "".join(chr(ord("a") + int(p, 16) - 0x1F1E6) for p in parts)


def _one_per_concept(items: list[SourceItem], rng: random.Random, cap: int) -> list[SourceItem]:
    by: dict[str, SourceItem] = {}
    for it in sorted(items, key=lambda i: (i.source, i.source_id)):
        by.setdefault(_ck(it), it)
    keys = sorted(by)
    if len(keys) > cap:
        keys = sorted(rng.sample(keys, cap))
    return [by[k] for k in keys]


def _retrieval(items: list[SourceItem]) -> tuple[list[EvalItem], list[str]]:
    items = sorted(items, key=lambda i: (i.source, i.source_id))
    return [EvalItem(it, k, it.caption, it.caption) for k, it in enumerate(items)], [it.caption for it in items]


def _classify(pairs: list[tuple[SourceItem, str]]) -> tuple[list[EvalItem], list[str]]:
    names = sorted({c for _, c in pairs})
    pairs = sorted(pairs, key=lambda p: (p[1], p[0].source, p[0].source_id))
    return [EvalItem(it, names.index(c), c, it.caption) for it, c in pairs], names


def split_v2(pool_items: list[SourceItem], style_items: list[SourceItem], spec, seed: int) -> Split:
    """Hold out v2 evaluation sets from the large pool's sources; every held-out concept key leaves
    every source (iconify's copies included), held-out styles never enter the pool at all, and any
    pool item whose source bytes equal an evaluation item's is dropped as well."""
    rng = random.Random(f"{seed}:heldout-v2")
    emoji_base = [it for it in pool_items if it.source in EMOJI_SOURCES and it.meta.get("base") and not _is_flag(it)]
    emoji_concepts = sorted({_ck(it) for it in emoji_base})
    held_e = set(rng.sample(emoji_concepts, round(spec.emoji_heldout * len(emoji_concepts))))

    icons = [it for it in pool_items if it.source == "iconify" and it.meta.get("web_kind", "none") == "none"
             and not _is_flag(it)]
    sets_of: dict[str, set[str]] = defaultdict(set)
    for it in icons:
        sets_of[_ck(it)].add(it.meta["collection"])
    icon_cands = sorted(c for c, s in sets_of.items() if len(s) >= spec.icon_min_sets and c not in held_e and c not in emoji_concepts)
    held_i = set(rng.sample(icon_cands, min(spec.icon_heldout, len(icon_cands))))

    stamps = sorted((it for it in pool_items if it.source == "tuxpaint"), key=lambda i: i.source_id)
    held_stamps = rng.sample(stamps, round(spec.tuxpaint_heldout * len(stamps)))
    held_t = {_ck(s) for s in held_stamps}
    held = held_e | held_i | held_t

    evalsets: dict[str, list[EvalItem]] = {}
    classnames: dict[str, list[str]] = {}

    # in-domain
    display: dict[str, str] = {}
    for it in sorted(emoji_base, key=lambda i: (i.source != "openmoji", i.source, i.source_id)):
        display.setdefault(_ck(it), it.meta["display"])
    e_concepts = sorted(held_e)
    per_concept = max(1, len(EMOJI_SOURCES))
    if len(e_concepts) * per_concept > spec.task_cap:
        e_concepts = sorted(rng.sample(e_concepts, max(1, spec.task_cap // per_concept)))
    chosen: dict[tuple[str, str], SourceItem] = {}
    for it in sorted(emoji_base, key=lambda i: (i.source, i.source_id)):
        if _ck(it) in e_concepts:
            chosen.setdefault((_ck(it), it.source), it)
    evalsets["emoji_heldout"], classnames["emoji_heldout"] = _classify(
        [(it, display[c]) for (c, _), it in sorted(chosen.items())])

    i_concepts = sorted(held_i)
    if len(i_concepts) * 3 > spec.task_cap:
        i_concepts = sorted(rng.sample(i_concepts, max(1, spec.task_cap // 3)))
    by_concept: dict[str, dict[str, SourceItem]] = defaultdict(dict)
    for it in sorted(icons, key=lambda i: i.source_id):
        if _ck(it) in held_i:
            by_concept[_ck(it)].setdefault(it.meta["collection"], it)
    pairs = []
    for c in i_concepts:
        per_set = [by_concept[c][s] for s in sorted(by_concept[c])]
        picked = rng.sample(per_set, min(3, len(per_set)))
        pairs += [(it, per_set[0].meta["display"]) for it in sorted(picked, key=lambda i: i.source_id)]
    evalsets["icon_heldout"], classnames["icon_heldout"] = _classify(pairs)
    evalsets["tuxpaint_heldout"], classnames["tuxpaint_heldout"] = _retrieval(held_stamps[: spec.task_cap])

    # the pool: held-out concepts leave every source; then byte copies of any evaluation item
    pool = [it for it in pool_items if _ck(it) not in held]
    pool_concepts = {_ck(it) for it in pool}

    # style shift: concepts the pool has, in styles it does not
    def style(pred) -> list[SourceItem]:
        return [it for it in style_items if pred(it) and it.meta.get("base") and _ck(it) in pool_concepts]

    om = _one_per_concept(style(lambda i: i.meta["style"] == "openmoji-black" and not _is_flag(i)), rng, spec.task_cap)
    evalsets["openmoji_line"], classnames["openmoji_line"] = _retrieval(om)
    fl = _one_per_concept(style(lambda i: i.meta["style"] == "fluent-high-contrast" and not _is_flag(i)), rng,
                          spec.task_cap)
    evalsets["fluent_contrast"], classnames["fluent_contrast"] = _retrieval(fl)
    from curate.pool.offline.large import FLAG_SETS, HELDOUT_ICON_SETS

    ic = _one_per_concept(style(lambda i: i.meta.get("collection") in HELDOUT_ICON_SETS and not _is_flag(i)), rng,
                          spec.task_cap)
    evalsets["iconset_shift"], classnames["iconset_shift"] = _retrieval(ic)

    country_of: dict[str, str] = {}
    for it in sorted(pool, key=lambda i: (i.source != "openmoji", i.source, i.source_id)):
        iso = _iso(it.code) if it.country else ""
        if iso:
            country_of.setdefault(iso, it.country)
    flag_pairs = []
    for it in sorted(style_items, key=lambda i: i.source_id):
        col = it.meta.get("collection")
        if col not in FLAG_SETS:
            continue
        name = it.source_id.split(":", 1)[1]
        code, _, aspect = name.partition("-")
        if aspect not in ("", "4x3") or code not in country_of:
            continue
        # the concept is the country's flag, as the pool's emoji flags name it ("flag: Angola")
        it.meta = {**it.meta, "concept": concept_key(f"flag: {country_of[code]}")}
        if it.meta["concept"] in pool_concepts:
            flag_pairs.append((it, country_of[code]))
    if len(flag_pairs) > spec.task_cap:
        flag_pairs = sorted(rng.sample(flag_pairs, spec.task_cap), key=lambda p: p[0].source_id)
    evalsets["flag_styles"], classnames["flag_styles"] = _classify(flag_pairs)
    for e in evalsets["flag_styles"]:
        e.caption = f"Flag: {e.classname}"

    held_sha = {hashlib.sha256(e.item.read_bytes()).hexdigest() for t in evalsets for e in evalsets[t]}
    kept, dropped = [], []
    for it in pool:
        if hashlib.sha256(it.read_bytes()).hexdigest() in held_sha:
            dropped.append(f"{it.source}:{it.source_id}")
        else:
            kept.append(it)
    return Split(kept, evalsets, classnames, dropped)
