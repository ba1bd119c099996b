"""Offline WordNet 3.0, loaded once per process from Debian's ``wordnet-base`` files.

Why this module exists: nltk's `WordNetCorpusReader` is the well-kept reader for the WordNet
database files, but (1) Debian's ``wordnet-base`` does not ship the ``lexnames`` file the reader
opens first (its content is the table in the ``lexnames(5WN)`` man page, reproduced below), and
(2) nltk 3.10 refuses corpus roots that are symlinks or outside an ``nltk_data`` tree. So on first
use we copy the database files plus ``lexnames`` into ``<cache>/nltk_data/corpora/wordnet/`` (built
in a temporary folder and renamed into place, so concurrent first uses are safe) and open that copy.

Noun synset offsets of WordNet 3.0 are ImageNet's wnids (``n`` + 8-digit offset), which is what
`first_noun_wnid` returns.

Sources (overridable): ``CURATE_WORDNET_DIR`` (default ``/usr/share/wordnet``) and the cache folder
``CURATE_CACHE`` (default ``~/.cache/curate``).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from curate.core.errors import MissingDependencyError

DEFAULT_WORDNET_DIR = "/usr/share/wordnet"

# The database files nltk's reader opens (lexnames is generated below).
WORDNET_FILES = (
    "data.adj", "data.adv", "data.noun", "data.verb",
    "index.adj", "index.adv", "index.noun", "index.verb",
    "adj.exc", "adv.exc", "noun.exc", "verb.exc",
)
OPTIONAL_FILES = ("cntlist.rev", "sentidx.vrb", "sents.vrb")

# lexnames(5WN): file number, lexicographer file name, syntactic category (1 noun, 2 verb, 3 adj, 4 adv).
LEXNAMES = (
    "adj.all 3", "adj.pert 3", "adv.all 4", "noun.Tops 1", "noun.act 1", "noun.animal 1",
    "noun.artifact 1", "noun.attribute 1", "noun.body 1", "noun.cognition 1", "noun.communication 1",
    "noun.event 1", "noun.feeling 1", "noun.food 1", "noun.group 1", "noun.location 1",
    "noun.motive 1", "noun.object 1", "noun.person 1", "noun.phenomenon 1", "noun.plant 1",
    "noun.possession 1", "noun.process 1", "noun.quantity 1", "noun.relation 1", "noun.shape 1",
    "noun.state 1", "noun.substance 1", "noun.time 1", "verb.body 2", "verb.change 2",
    "verb.cognition 2", "verb.communication 2", "verb.competition 2", "verb.consumption 2",
    "verb.contact 2", "verb.creation 2", "verb.emotion 2", "verb.motion 2", "verb.perception 2",
    "verb.possession 2", "verb.social 2", "verb.stative 2", "verb.weather 2", "adj.ppl 3",
)
assert len(LEXNAMES) == 45


def lexnames_text() -> str:
    """The ``lexnames`` file content: ``NN<TAB>name<TAB>category`` per line."""
    return "".join(
        f"{i:02d}\t{name}\t{cat}\n" for i, (name, cat) in (
            (i, entry.split()) for i, entry in enumerate(LEXNAMES)
        )
    )


# Words that WordNet lists as nouns but that are function words in a caption ("a" = vitamin A,
# "in" = inch, "it" = information technology, "us" = United States ...). Hand-written because the
# nltk stopwords corpus is a separate download that is not available offline.
STOP_WORDS = frozenset(
    """a an the and or but if then else of on in at to from by for with without about above below
    over under into onto out up down off again further once here there when where why how all any
    both each few more most other some such no nor not only own same so than too very can will just
    don should now i me my myself we our ours ourselves you your yours yourself yourselves he him his
    himself she her hers herself it its itself they them their theirs themselves what which who whom
    this that these those am is are was were be been being have has had having do does did doing
    would could might must shall may one two three four five six seven eight nine ten us ok
    image photo picture stock free vector clipart clip art illustration png jpg svg icon""".split()
)
# The last line are caption boilerplate words: frequent in web captions, never a rare concept.

# Words in any script (letters only, inner hyphens/apostrophes): "háhælaður" stays one word, so a
# non-English caption cannot leak English-looking fragments ("ur", "la") into WordNet lookups.
_WORD_RE = re.compile(r"[^\W\d_]+(?:['\-][^\W\d_]+)*")

_lock = threading.Lock()


def wordnet_source_dir() -> Path:
    return Path(os.environ.get("CURATE_WORDNET_DIR", DEFAULT_WORDNET_DIR))


def default_cache_dir() -> Path:
    return Path(os.environ.get("CURATE_CACHE", Path.home() / ".cache" / "curate"))


def _check_source(src: Path) -> None:
    missing = [f for f in WORDNET_FILES if not (src / f).is_file()]
    if missing:
        raise MissingDependencyError(
            f"WordNet 3.0 (expected at {src}; missing {', '.join(missing[:3])}"
            f"{'...' if len(missing) > 3 else ''})",
            "sudo apt-get install wordnet-base   (or: make setup; or set CURATE_WORDNET_DIR)",
        )


def install_corpus(cache_dir: str | os.PathLike | None = None) -> Path:
    """Ensure ``<cache>/nltk_data/corpora/wordnet/`` holds a complete nltk-readable copy; return it.

    Idempotent: a complete copy (``lexnames`` is written last, so its presence marks completion)
    is left alone. The copy is assembled in a temporary sibling folder and renamed into place; if
    another process wins the race, its copy is used and ours is discarded.
    """
    src = wordnet_source_dir()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dest = cache / "nltk_data" / "corpora" / "wordnet"
    if (dest / "lexnames").is_file():
        return dest
    _check_source(src)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-wordnet.", dir=dest.parent))
    try:
        for name in WORDNET_FILES + OPTIONAL_FILES:
            if (src / name).is_file():
                # copyfile follows symlinks: the copy is a real file, as nltk 3.10 requires.
                shutil.copyfile(src / name, tmp / name)
        (tmp / "lexnames").write_text(lexnames_text(), encoding="utf-8")
        try:
            os.rename(tmp, dest)
        except OSError:
            # dest appeared meanwhile (another process finished first) or is an incomplete
            # leftover from a killed run without lexnames: replace only the latter.
            if (dest / "lexnames").is_file():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                shutil.rmtree(dest, ignore_errors=True)
                os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _reader_class():
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class _WordNet30Reader(WordNetCorpusReader):
        """nltk's reader without its WordNet-version mapping.

        nltk maps synset ids from "its" WordNet (the ``wordnet`` download) to the loaded database
        when their version strings differ, which needs that download's ``index.sense``. The
        database we load *is* WordNet 3.0, so the mapping is the identity: skip it.
        """

        def map_wn(self, version="wordnet"):
            return None

    return _WordNet30Reader


_READER: Any = None
_READER_ROOT: Path | None = None


def get_wordnet(cache_dir: str | os.PathLike | None = None):
    """The process-wide nltk `WordNetCorpusReader` (loaded once; ~2 s the first time)."""
    global _READER, _READER_ROOT
    with _lock:
        if _READER is None:
            root = install_corpus(cache_dir)
            import nltk.data

            # nltk 3.10 only opens corpora under a registered nltk_data root.
            nltk_root = str(root.parent.parent)
            if nltk_root not in nltk.data.path:
                nltk.data.path.append(nltk_root)

            with warnings.catch_warnings():
                # "multilingual functions are not available": we only use English WordNet.
                warnings.simplefilter("ignore")
                _READER = _reader_class()(str(root), None)
            _READER_ROOT = root
        return _READER


def _norm(word: str) -> str:
    return word.strip().lower().replace(" ", "_").replace("-", "_")


@lru_cache(maxsize=200_000)
def noun_synsets(word: str) -> tuple:
    """Noun synsets of `word` (or multi-word lemma "ice cream" / "ice_cream"), most frequent first.

    Falls back to morphological base forms via WordNet's morphy ("foxes" -> "fox",
    "geese" -> "goose"). Empty tuple for words not in WordNet as nouns.
    """
    wn = get_wordnet()
    w = _norm(word)
    if not w:
        return ()
    found = wn.synsets(w, pos="n")  # nltk's synsets() already applies morphy
    if not found:
        base = wn.morphy(w, "n")
        if base and base != w:
            found = wn.synsets(base, pos="n")
    return tuple(found)


def noun_base_form(word: str) -> str | None:
    """WordNet's base form of a noun ("sashimis" -> "sashimi"), or None if not a WordNet noun."""
    wn = get_wordnet()
    return wn.morphy(_norm(word), "n")


def first_noun_wnid(word: str) -> str | None:
    """ImageNet-style wnid (``n`` + 8-digit offset) of the most frequent noun sense, or None."""
    syns = noun_synsets(word)
    return synset_wnid(syns[0]) if syns else None


def synset_wnid(synset) -> str:
    return f"{synset.pos()}{synset.offset():08d}"


def gloss(synset) -> str:
    """The definition of a synset ("very thinly sliced raw fish")."""
    return synset.definition()


@dataclass(frozen=True)
class NounMatch:
    """A WordNet noun found in a text: the words as written, the lemma key and the first sense."""

    text: str  # as it appeared, e.g. "ice creams"
    lemma: str  # WordNet lemma of the first sense that matches, e.g. "ice_cream"
    synset: Any  # nltk Synset (most frequent noun sense)
    start: int  # token index
    end: int  # token index, exclusive


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens (letters, inner hyphens/apostrophes; digits and punctuation dropped)."""
    return [t.lower() for t in _WORD_RE.findall(text or "")]


@lru_cache(maxsize=1)
def multiword_first_words() -> frozenset[str]:
    """First words of WordNet's multi-word noun lemmas ("ice" for ice_cream): a cheap pre-check
    that skips most n-gram lookups, which are the bulk of the work on real captions."""
    wn = get_wordnet()
    return frozenset(name.split("_", 1)[0] for name in wn.all_lemma_names(pos="n") if "_" in name)


def find_nouns(text: str, max_words: int = 3, stop_words: frozenset[str] = STOP_WORDS) -> list[NounMatch]:
    """WordNet nouns in `text`, longest multi-word lemma first, left to right, no overlaps.

    "a bowl of ice cream" -> bowl, ice_cream (not "ice" and "cream" separately). Single stop words
    are skipped; a multi-word lemma may contain them ("cup of tea" is not in WordNet, but
    "man of war" is). Matching uses WordNet's morphy, so plurals and irregular forms are found.
    """
    toks = tokenize(text)
    firsts = multiword_first_words()
    out: list[NounMatch] = []
    i = 0
    while i < len(toks):
        matched = False
        for n in range(min(max_words, len(toks) - i), 0, -1):
            words = toks[i : i + n]
            if n == 1 and words[0] in stop_words:
                break
            if n > 1 and (words[0] not in firsts or words[0] in stop_words or words[-1] in stop_words):
                continue
            if n == 1 and len(words[0]) < 2:
                break
            syns = noun_synsets("_".join(words))
            if syns:
                base = noun_base_form("_".join(words)) or "_".join(words)
                out.append(NounMatch(" ".join(words), base, syns[0], i, i + n))
                i += n
                matched = True
                break
        if not matched:
            i += 1
    return out
