"""Sources and web-crawl noise of the large offline pool (`curate pool build-offline --size large`).

Sources beyond the small/full pool's three (openclipart, Tux Paint, Twemoji), each a pinned package
(curate/pool/offline/packages.py):

  iconify   named SVG icons, one row per icon, caption = the icon's name in words. `--size large`
            reads the complete @iconify/json (243 sets); `--size large-mini` reads the per-set
            @iconify-json/<set> packages `make setup` installs. Deny-listed sets are never read.
  openmoji  OpenMoji colour SVGs (pool) and black line art (style-shift evaluation only).
  fluent    Microsoft Fluent emoji: flat SVGs (pool) and high-contrast (style-shift evaluation only).
  noto      Google's Noto emoji PNGs from emoji-datasource-google (`--size large` only: 74 MB download).
  freeciv   Debian freeciv-data: 559 nation flags, each captioned by the nation's legend paragraph.

Every item carries meta = {package, version, license, collection, concept, style, category, slug}.
`concept` is curate.pool.offline.concepts.concept_key of the item's name; emoji names are CLDR names
(from openmoji's table, keyed by code point), so the same emoji has the same key in every source.

Trusted subset (by source, never by truth.parquet): rows whose source is in TRUSTED_SOURCES, the
sources whose captions are curated names (Tux Paint stamp captions, emoji names). A scorer trained
on it learns from what a practitioner could know without ground truth; its seeded noise stays in.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from curate.core.errors import CurateError, MissingDependencyError
from curate.pool.offline.concepts import concept_key, display_name
from curate.pool.offline.packages import (
    CI_ICONIFY_SETS, DENIED_COLLECTION_WORDS, DENIED_ICONIFY_SETS, PINS, node_modules, verify_package,
)
from curate.pool.offline.sources import SourceItem, read_twemoji

TRUSTED_SOURCES = ("tuxpaint", "twemoji", "noto", "openmoji", "fluent")
FREECIV_DIR = Path("/usr/share/games/freeciv")   # Debian freeciv-data; $CURATE_FREECIV overrides

# iconify sets whose whole style is held out of the pool (style-shift evaluation): pixel art, line
# emoji, high-contrast Fluent (the same art as fluentui-emoji's held-out style), flags in other styles.
HELDOUT_ICON_SETS = ("pixelarticons", "emojione-monotone", "icon-park-outline")
HELDOUT_EMOJI_COPIES = ("fluent-emoji-high-contrast",)
FLAG_SETS = ("flag", "circle-flags", "flagpack")
POOL_EXCLUDED_SETS = HELDOUT_ICON_SETS + HELDOUT_EMOJI_COPIES + FLAG_SETS
# iconify sets that are the same art as a pool source's own package: real cross-source copies
COPY_SETS = {"twemoji": "twemoji", "noto": "noto", "openmoji": "openmoji", "fluent-emoji-flat": "fluent"}
BRAND_CATEGORIES = ("Logos", "Programming")
BRAND_SETS = ("arcticons", "simple-icons", "logos", "skill-icons", "devicon", "devicon-plain", "vscode-icons",
              "file-icons", "brandico", "fa-brands", "fa6-brands", "cib", "bxl", "mdi-brands")
UI_CATEGORIES = ("UI 24px", "UI 16px / 32px", "UI Other / Mixed Grid", "Material", "UI Multicolor")
UI_WORDS = frozenset("""
arrow chevron caret menu check checkbox close plus minus dot dots align format text border grid layout sort
filter toggle radio square circle triangle corner expand collapse maximize minimize fullscreen drag handle
indent outdent undo redo refresh reload sync loader loading spinner more horizontal vertical left right up
down forward backward back next previous prev first last start end page row column table cursor pointer
select selection slider switch tab panel sidebar window frame box input button badge bullet list divider
separator split merge resize move zoom search settings cog gear option ellipsis hamburger kebab
""".split())
BOILERPLATE = (
    "image", "icon", "untitled", "thumbnail", "click here", "download", "logo", "picture", "img", "photo",
    "free vector icon", "stock vector", "clipart", "icon 24px", "placeholder", "view image", "see more",
    "Download free SVG icon", "image not found", "IMG_{n}.png", "DSC{n}.jpg", "screenshot {n}",
)

_SLUG = re.compile(r"[^a-z0-9]+")
_FLUENT_TONE = re.compile(r"^(.*?)-(default|light|medium-light|medium|medium-dark|dark)$")


def slug(name: str) -> str:
    """`thumbs up: dark skin tone` -> `thumbs-up-dark-skin-tone` (iconify's naming)."""
    return _SLUG.sub("-", name.lower()).strip("-")


def _meta(pkg: dict, license: str, name: str, style: str, collection: str = "", category: str = "",
          concept_name: str | None = None, slug_name: str | None = None) -> dict:
    return {"package": pkg["name"], "version": pkg["version"], "license": license, "collection": collection,
            "style": style, "category": category, "concept": concept_key(concept_name or name),
            "display": display_name(concept_name or name), "slug": slug(slug_name or name)}


def _hex(code: str) -> str:
    return "-".join(p for p in code.upper().split("-") if p and p != "FE0F")


def _load_json(path: Path, pkg: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CurateError(f"{path}: unreadable ({e}); reinstall with: {PINS[pkg].install}") from None


# ------------------------------------------------------------------ openmoji (also: CLDR names)

def cldr_names(openmoji_root: Path) -> dict[str, str]:
    """Code point sequence (no FE0F) -> CLDR name ("1F44D-1F3FB" -> "thumbs up: light skin tone")."""
    table = _load_json(openmoji_root / "data" / "openmoji.json", "openmoji")
    return {_hex(e["hexcode"]): e["annotation"] for e in table if e.get("annotation")}


def read_openmoji(root: Path, pkg: dict, style: str) -> list[SourceItem]:
    """OpenMoji `color` or `black` SVGs, captioned by their CLDR annotation (skin tones grouped)."""
    table = _load_json(root / "data" / "openmoji.json", "openmoji")
    items = []
    for e in sorted(table, key=lambda e: e["hexcode"]):
        if e.get("group") in ("component",) or not e.get("annotation"):
            continue
        path = root / style / "svg" / f"{e['hexcode']}.svg"
        if not path.is_file():
            continue
        name = e["annotation"]
        base = e.get("skintone_base_hexcode") or e["hexcode"]
        country = name.split(":", 1)[1].strip() if e.get("subgroups") == "country-flag" else ""
        it = SourceItem("openmoji", f"{style}/{e['hexcode']}", path, name, category=e.get("group", ""),
                        subcategory=e.get("subgroups", ""), group=f"openmoji:{base}", country=country,
                        code=e["hexcode"])
        it.meta = _meta(pkg, PINS["openmoji"].license, name, f"openmoji-{style}", category=e.get("group", ""))
        it.meta["base"] = not e.get("skintone")
        items.append(it)
    return items


# ------------------------------------------------------------------ fluent

def read_fluent(root: Path, pkg: dict, style: str) -> list[SourceItem]:
    """fluentui-emoji `flat` or `high-contrast` SVGs; `<name>-<tone>.svg` are one group."""
    folder = root / "icons" / style
    items = []
    for path in sorted(folder.glob("*.svg")):
        stem = path.stem
        m = _FLUENT_TONE.match(stem)
        base_name, tone = (m.group(1), m.group(2)) if m else (stem, "")
        words = base_name.replace("-", " ")
        caption = words if tone in ("", "default") else f"{words}: {tone} skin tone"
        it = SourceItem("fluent", f"{style}/{path.name}", path, caption, group=f"fluent:{base_name}")
        it.meta = _meta(pkg, PINS["fluentui-emoji"].license, caption, f"fluent-{style}",
                        slug_name=stem.removesuffix("-default"))
        it.meta["base"] = tone in ("", "default")
        items.append(it)
    return items


# ------------------------------------------------------------------ freeciv (Debian freeciv-data)

_FC_NAME = re.compile(r'^\s*name\s*=\s*_\("((?:[^"\\]|\\.)*)"\)', re.M)
_FC_LEGEND = re.compile(r'^\s*legend\s*=\s*_\("((?:[^"\\]|\\.)*)"\)', re.M | re.S)
_FC_FLAG = re.compile(r'^\s*flag\s*=\s*"([^"]*)"', re.M)
FREECIV_LICENSE = "GPL-2.0-or-later"


def _fc_string(s: str) -> str:
    """A Freeciv ruleset string: backslash-newline continues it, `\\n` is a line break, `\\x` is x."""
    s = re.sub(r"\\(.)", lambda m: " " if m.group(1) == "n" else m.group(1), s.replace("\\\n", ""), flags=re.S)
    return re.sub(r"\s+", " ", s).strip()


def read_freeciv(root: Path, pkg: dict) -> list[SourceItem]:
    """Freeciv nations: the nation's flag (flags/<flag>-large.png) captioned by its real legend
    paragraph ("Dutch flag: When the Holy Roman Emperor sentenced ..."), the longest real captions
    in the pool. The concept is the flag's name ("flag netherlands")."""
    items = []
    for path in sorted((root / "nation").glob("*.ruleset")):
        text = path.read_text(encoding="utf-8", errors="replace")
        name, legend, flag = _FC_NAME.search(text), _FC_LEGEND.search(text), _FC_FLAG.search(text)
        if not (name and legend and flag):
            continue
        image = next((p for p in (root / "flags" / f"{flag.group(1)}-large.png", root / "flags" / f"{flag.group(1)}.png")
                      if p.is_file()), None)
        if image is None:
            continue
        nation, story = _fc_string(name.group(1)), _fc_string(legend.group(1))
        it = SourceItem("freeciv", path.stem, image, f"{nation} flag: {story}", group=f"freeciv:{path.stem}")
        it.meta = _meta(pkg, FREECIV_LICENSE, f"flag {flag.group(1).replace('_', ' ')}", "freeciv")
        it.meta["base"] = True
        items.append(it)
    if not items:
        raise MissingDependencyError(f"Freeciv nations (none found under {root})",
                                     "sudo apt-get install freeciv-data   (or: make setup)")
    return items


# ------------------------------------------------------------------ emoji-datasource (twemoji, noto)

def read_emoji_datasource(root: Path, pkg: dict, vendor: str, source: str, cldr: dict[str, str]) -> list[SourceItem]:
    """The emoji-datasource reader of the small pool, with CLDR-name concepts and licences added."""
    items = read_twemoji(root, vendor=vendor, source=source, install=PINS[pkg["name"]].install)
    for it in items:
        name = cldr.get(_hex(it.code)) or it.caption
        it.meta = _meta(pkg, PINS[pkg["name"]].license, name, source)
        it.meta["base"] = it.source_id == it.group
    return items


# ------------------------------------------------------------------ iconify

def iconify_svg(icon: dict, width: int, height: int) -> bytes:
    """An iconify icon body as a standalone SVG (currentColor -> black; the build flattens on white)."""
    left, top = icon.get("left", 0), icon.get("top", 0)
    w, h = icon.get("width", width), icon.get("height", height)
    body = icon["body"].replace("currentColor", "#000")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'viewBox="{left} {top} {w} {h}" width="{w}" height="{h}">{body}</svg>').encode()


def iconify_denied(prefix: str) -> bool:
    return prefix in DENIED_ICONIFY_SETS or any(w in prefix for w in DENIED_COLLECTION_WORDS)


def iconify_sets(full: bool):
    """Yield (prefix, icon set json, info, file, package record), one set at a time (the complete
    @iconify/json is 464 MB of JSON: it is never held in memory at once)."""
    if full:
        pkg = verify_package("@iconify/json")
        folder = Path(pkg["root"]) / "json"
        for path in sorted(folder.glob("*.json")):
            prefix = path.stem
            if iconify_denied(prefix):
                continue  # deny-listed: never parsed
            data = _load_json(path, "@iconify/json")
            yield prefix, data, data.get("info") or {}, path, pkg
        return
    for prefix in CI_ICONIFY_SETS:
        pkg = verify_package(f"@iconify-json/{prefix}")
        root = Path(pkg["root"])
        data = _load_json(root / "icons.json", pkg["name"])
        info = _load_json(root / "info.json", pkg["name"])
        yield prefix, data, info, root / "icons.json", pkg


def read_iconify_set(prefix: str, data: dict, info: dict, path: Path, pkg: dict, per_set: int | None,
                     seed: int) -> list[SourceItem]:
    """One item per (non-hidden, non-alias) icon; at most `per_set` (a seeded sample)."""
    if iconify_denied(prefix):
        return []
    spdx = ((info.get("license") or {}).get("spdx") or "unknown")
    category = info.get("category", "")
    width, height = data.get("width", 16), data.get("height", 16)
    names = sorted(n for n, icon in data.get("icons", {}).items() if not icon.get("hidden") and "body" in icon)
    if per_set is not None and len(names) > per_set:
        names = sorted(random.Random(f"{seed}:iconify:{prefix}").sample(names, per_set))
    author = info.get("author") or {}
    items = []
    for name in names:
        icon = data["icons"][name]
        it = SourceItem("iconify", f"{prefix}:{name}", path, name.replace("-", " "),
                        category=category, group=f"iconify:{prefix}:{name}",
                        data=iconify_svg(icon, width, height))
        it.meta = _meta(pkg, spdx, name, f"iconify-{prefix}", collection=prefix, category=category)
        it.meta.update(set_name=info.get("name", prefix), author=author.get("name", ""),
                       author_url=author.get("url", ""), license_url=(info.get("license") or {}).get("url", ""),
                       base=True)
        items.append(it)
    return items


# ------------------------------------------------------------------ the large pool's sources

@dataclass(frozen=True)
class LargeSpec:
    """What one large size reads. None = everything."""

    iconify_full: bool            # @iconify/json (large) or the per-set CI packages (large-mini)
    iconify_per_set: int | None   # cap per icon set in the pool (keeps one big set from dominating)
    openclipart: int | None
    tuxpaint: int | None
    emoji_groups: int | None      # per emoji source: seeded sample of base emoji (with their variants)
    noto: bool                    # emoji-datasource-google (opt-in package)
    emoji_heldout: float          # fraction of emoji concepts held out (in-domain task)
    icon_heldout: int             # icon concepts held out (in-domain task)
    tuxpaint_heldout: float       # fraction of stamps held out (in-domain retrieval)
    task_cap: int                 # at most this many items per evaluation task
    iconify_eval_per_set: int | None = None   # cap per held-out icon set (style-shift source)
    freeciv: int | None = None    # Freeciv nations (flag + legend), a seeded sample; None = all
    icon_min_sets: int = 2        # a held-out icon concept is drawn in at least this many pool sets


def _sample_groups(items: list[SourceItem], n: int | None, seed: int, name: str) -> list[SourceItem]:
    if n is None:
        return items
    groups = sorted({it.group for it in items})
    keep = set(random.Random(f"{seed}:{name}-sample").sample(groups, min(n, len(groups))))
    return [it for it in items if it.group in keep]


def read_large_sources(spec: LargeSpec, seed: int) -> tuple[list[SourceItem], list[SourceItem], dict]:
    """(pool candidates, evaluation-only style items, package records) for a large size.

    Pool candidates are all items that may enter the pool; evaluation-only items are the styles held
    out of it (OpenMoji black, Fluent high-contrast, held-out iconify sets and flag sets).
    """
    mods = node_modules()
    packages: dict[str, dict] = {}

    def pkg(name: str) -> dict:
        if name not in packages:
            packages[name] = verify_package(name, mods / name)
        return packages[name]

    om_root = mods / "openmoji"
    cldr = cldr_names(Path(pkg("openmoji")["root"]))
    twemoji = read_emoji_datasource(mods / "emoji-datasource-twitter", pkg("emoji-datasource-twitter"), "twitter",
                                    "twemoji", cldr)
    pool = _sample_groups(twemoji, spec.emoji_groups, seed, "twemoji")
    if spec.noto:
        noto = read_emoji_datasource(mods / "emoji-datasource-google", pkg("emoji-datasource-google"), "google",
                                     "noto", cldr)
        pool += _sample_groups(noto, spec.emoji_groups, seed, "noto")
    pool += _sample_groups(read_openmoji(om_root, pkg("openmoji"), "color"), spec.emoji_groups, seed, "openmoji")
    fl_root = mods / "fluentui-emoji"
    pool += _sample_groups(read_fluent(fl_root, pkg("fluentui-emoji"), "flat"), spec.emoji_groups, seed, "fluent")
    style = read_openmoji(om_root, pkg("openmoji"), "black") + read_fluent(fl_root, pkg("fluentui-emoji"),
                                                                            "high-contrast")
    for prefix, data, info, path, p in iconify_sets(spec.iconify_full):
        packages.setdefault(p["name"], p)
        if prefix in HELDOUT_ICON_SETS or prefix in FLAG_SETS:
            style += read_iconify_set(prefix, data, info, path, p, spec.iconify_eval_per_set, seed)
        elif prefix not in POOL_EXCLUDED_SETS:
            pool += read_iconify_set(prefix, data, info, path, p, spec.iconify_per_set, seed)
    if not pool:
        raise MissingDependencyError("the large pool's sources", "make setup")
    return pool, style, packages


# ------------------------------------------------------------------ web-crawl noise

def web_kind(item: SourceItem) -> str:
    """The real web-crawl noise kind an item carries by what it is ("none" if none)."""
    m = item.meta
    col = m.get("collection", "")
    if col in COPY_SETS:
        return "cross_source_copy"
    if col and (col in BRAND_SETS or m.get("category") in BRAND_CATEGORIES):
        return "brand_logo"
    if col and m.get("category") in UI_CATEGORIES and set(m.get("concept", "").split()) & UI_WORDS:
        return "ui_glyph"
    return "none"


def boilerplate_text(rng: random.Random) -> str:
    return rng.choice(BOILERPLATE).format(n=rng.randint(1000, 99999))


def tag_web_noise(rows, boilerplate_fraction: float, seed: int) -> dict:
    """Set each base row's real web kind, then replace a seeded fraction of the clean rows' captions
    with boilerplate. Cross-source copies point (duplicate_of) to the row of the same art in its own
    package when the pool has it. Rows are modified in place; returns {kind: count}."""
    from collections import Counter

    by_slug: dict[tuple[str, str], int] = {}
    for i, r in enumerate(rows):
        if r.source in COPY_SETS.values():
            by_slug.setdefault((r.source, r.meta.get("slug", "")), i)
    for i, r in enumerate(rows):
        kind = r.meta.get("web_kind", "none")
        if kind != "none":
            r.noise = kind
            if kind == "cross_source_copy":
                r.duplicate_of = by_slug.get((COPY_SETS[r.meta["collection"]], r.meta.get("slug", "")))
    rng = random.Random(f"{seed}:boilerplate")
    clean = [i for i, r in enumerate(rows) if r.noise == "none"]
    for i in sorted(rng.sample(clean, min(len(clean), round(boilerplate_fraction * len(rows))))):
        rows[i].text, rows[i].noise = boilerplate_text(rng), "boilerplate"
    return dict(sorted(Counter(r.noise for r in rows).items()))
