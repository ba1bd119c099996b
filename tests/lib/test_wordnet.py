"""curate.lib.wordnet: offline WordNet 3.0 from Debian's files, installed once into a cache."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from curate.lib import wordnet
from curate.core.errors import MissingDependencyError

pytestmark = pytest.mark.skipif(
    not Path(wordnet.wordnet_source_dir(), "data.noun").is_file(),
    reason="wordnet-base not installed (make setup)",
)


def test_lexnames_matches_man_page_format():
    lines = wordnet.lexnames_text().splitlines()
    assert len(lines) == 45
    assert lines[0] == "00\tadj.all\t3"
    assert lines[5] == "05\tnoun.animal\t1"
    assert lines[13] == "13\tnoun.food\t1"
    assert lines[44] == "44\tadj.ppl\t3"
    # Every lexicographer file number used by the Debian data files has a name.
    used = set()
    with open(Path(wordnet.wordnet_source_dir(), "data.noun"), encoding="utf-8") as fh:
        for line in fh:
            if not line.startswith(" "):
                used.add(int(line.split()[1]))
    assert used <= set(range(45)) and used == set(range(3, 29))


def test_install_copies_real_files_and_is_idempotent(tmp_path):
    dest = wordnet.install_corpus(tmp_path)
    assert dest == tmp_path / "nltk_data" / "corpora" / "wordnet"
    for name in wordnet.WORDNET_FILES + ("lexnames",):
        p = dest / name
        assert p.is_file() and not p.is_symlink(), name
    stamp = (dest / "data.noun").stat().st_mtime_ns
    assert wordnet.install_corpus(tmp_path) == dest
    assert (dest / "data.noun").stat().st_mtime_ns == stamp  # not copied again
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".tmp-")]


def test_install_replaces_incomplete_leftover(tmp_path):
    dest = tmp_path / "nltk_data" / "corpora" / "wordnet"
    dest.mkdir(parents=True)
    (dest / "data.noun").write_text("truncated by a kill")
    wordnet.install_corpus(tmp_path)
    assert (dest / "lexnames").is_file()
    assert (dest / "data.noun").stat().st_size > 10_000_000


def _install(cache):
    return str(wordnet.install_corpus(cache))


def test_concurrent_first_use_is_safe(tmp_path):
    with mp.get_context("spawn").Pool(3) as pool:
        results = pool.map(_install, [str(tmp_path)] * 3)
    assert len(set(results)) == 1
    dest = Path(results[0])
    assert (dest / "data.noun").stat().st_size == Path(wordnet.wordnet_source_dir(), "data.noun").stat().st_size
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".tmp-")]


def test_missing_wordnet_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CURATE_WORDNET_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(MissingDependencyError) as e:
        wordnet.install_corpus(tmp_path / "cache")
    msg = str(e.value.message)
    assert "nowhere" in msg and "wordnet-base" in msg


def test_lookups():
    assert wordnet.get_wordnet() is wordnet.get_wordnet()  # cached, loaded once
    assert wordnet.first_noun_wnid("dog") == "n02084071"  # ImageNet's wnid for dog
    assert wordnet.first_noun_wnid("goldfish") == "n01443537"  # ImageNet class 1
    assert wordnet.first_noun_wnid("xyzzyplugh") is None
    assert wordnet.first_noun_wnid("") is None
    # morphological base forms
    assert wordnet.noun_synsets("geese")[0].name() == "goose.n.01"
    assert wordnet.noun_base_form("sashimis") == "sashimi"
    # multi-word lemmas, with space, underscore or hyphen
    for form in ("ice cream", "ice_cream", "Ice-Cream"):
        assert wordnet.noun_synsets(form)[0].name() == "ice_cream.n.01"
    assert wordnet.gloss(wordnet.noun_synsets("sashimi")[0]) == "very thinly sliced raw fish"
    # verbs/adjectives only are not nouns
    assert wordnet.noun_synsets("quickly") == ()


def test_find_nouns_longest_match_and_stop_words():
    found = wordnet.find_nouns("A bowl of ice creams and two sashimis, on the tabby cat!")
    assert [m.lemma for m in found] == ["bowl", "ice_cream", "sashimi", "tabby_cat"]
    assert [m.text for m in found] == ["bowl", "ice creams", "sashimis", "tabby cat"]
    # stop words that WordNet knows as nouns ("a" = vitamin A, "in" = inch, "it") are skipped
    assert wordnet.find_nouns("it is in a the of") == []
    assert wordnet.find_nouns("zzqx blorpt 12345") == []
    assert wordnet.find_nouns("") == []


def test_non_latin_words_are_whole_tokens():
    # Icelandic "red high-heeled shoe": no English-looking fragments ("ur", "la") may match WordNet
    assert wordnet.tokenize("Rauður háhælaður skór") == ["rauður", "háhælaður", "skór"]
    assert wordnet.find_nouns("Rauður háhælaður skór") == []
    assert wordnet.tokenize("a dog's well-known hat-trick, 2024!") == ["a", "dog's", "well-known", "hat-trick"]
