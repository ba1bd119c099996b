"""The normalised concept key: what "the same concept" means when the large pool holds concepts out.

Zero-shot evaluation needs a rule that decides, across every source, whether a pool row shows a
held-out concept. Names differ by source ("1st-place-medal", "1st place medal: dark skin tone",
"mdi:bicycle-outline", "Bicycles"), so every name is reduced to a key:

1. Unicode NFKD, ASCII only, lower case; "&" reads as "and".
2. Skin-tone phrases ("medium-dark skin tone") are removed: an emoji and its tones are one concept.
3. Split on anything that is not a letter or digit.
4. Style and size tokens are dropped (STYLE_TOKENS: outline, filled, bold, duotone, ...; pure
   numbers such as icon sizes 16/24/48; aspect tokens such as "4x3").
5. A crude plural fold ("boxes" -> "box", "berries" -> "berry", "cats" -> "cat").
6. The remaining distinct tokens, sorted, joined by one space ("weary face" == "face weary").

The key is deliberately coarse: two different concepts that collide ("dog house" / "house dog")
are both held out together, which only removes more from the pool; it never lets a test concept in.
A name with no token left (e.g. "24") keeps its raw tokens so it still has a key.
"""

from __future__ import annotations

import re
import unicodedata

STYLE_TOKENS = frozenset("""
outline outlined outlines filled fill solid bold thin light regular duotone twotone sharp rounded round
line lines linear broken stroke stroked alt variant twotone mini micro small large tiny o x2 px
""".split())

_SKIN = re.compile(r"[:,]?\s*\b(?:light|medium-light|medium|medium-dark|dark)\s+skin\s+tones?\b")
_ASPECT = re.compile(r"^\d+x\d+$")


def _fold(tok: str) -> str:
    if len(tok) > 4 and tok.endswith("ies"):
        return tok[:-3] + "y"
    if len(tok) > 4 and tok.endswith(("xes", "ches", "shes", "sses")):
        return tok[:-2]
    if len(tok) > 3 and tok.endswith("s") and not tok.endswith(("ss", "us", "is")):
        return tok[:-1]
    return tok


def tokens(name: str) -> list[str]:
    """The words of `name` after steps 1-3 (style tokens still in)."""
    s = unicodedata.normalize("NFKD", name or "").encode("ascii", "ignore").decode().lower()
    s = _SKIN.sub(" ", s.replace("&", " and "))
    return [t for t in re.split(r"[^a-z0-9]+", s) if t]


def concept_key(name: str) -> str:
    """The normalised concept key of a name (see the module docstring for the rule)."""
    raw = tokens(name)
    kept = [t for t in raw if t not in STYLE_TOKENS and not t.isdigit() and not _ASPECT.match(t)]
    if not kept:
        kept = raw
    return " ".join(sorted({_fold(t) for t in kept}))


def display_name(name: str) -> str:
    """A readable class name: the words of `name` with style/size tokens dropped, in order."""
    raw = tokens(name)
    kept = [t for t in raw if t not in STYLE_TOKENS and not t.isdigit() and not _ASPECT.match(t)]
    return " ".join(kept or raw)
