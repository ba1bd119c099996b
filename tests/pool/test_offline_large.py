"""The large offline pool's mix at CI size (`--size large-mini`): pinned counts by source and noise
kind, licences vs the deny-list, package pins, attribution, the trusted subset, determinism, and
zero-shot by construction (sha256, a perceptual hash, concept keys), plus the v2 evaluation suite."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from benchmark import evalsets as E
from benchmark.tasks import (
    IN_DOMAIN, OFFLINE_V2_KEYS, OUT_OF_DOMAIN, STYLE_SHIFT, SUITE_V2_GROUPS, SUITE_V2_HEADLINE, SUITE_V2_REASONS,
    TASKS, resolve_tasks,
)
from curate.cli import main
from curate.core.errors import CurateError, MissingDependencyError
from curate.pool.offline import large as L
from curate.pool.offline.build import OfflinePoolConfig, build_offline
from curate.pool.offline.concepts import concept_key
from curate.pool.offline.evalsplits import V2_TASKS
from curate.pool.offline.packages import (
    DENIED_ICONIFY_SETS, DENIED_PACKAGES, PINS, check_allowed, needs_attribution, node_modules, verify_package,
)
from curate.pool.offline.phash import NEAR_COPY_BITS, dhash

# What `--size large-mini --seed 0` builds from the pinned packages (and Debian bookworm's
# openclipart-svg / tuxpaint-stamps-default). A change here is a change of the pool: say why.
EXPECTED_BY_SOURCE_AND_NOISE = {
    "fluent": {"boilerplate": 4, "caption_swap": 14, "empty_caption": 1, "exact_dup": 5, "http_404": 4,
               "near_dup_reencode": 3, "near_dup_resize": 1, "none": 107, "not_image": 1, "oversized": 1},
    "freeciv": {"bomb": 1, "caption_swap": 8, "empty_caption": 2, "exact_dup": 2, "http_404": 2,
                "near_dup_crop": 1, "none": 30},
    "iconify": {"boilerplate": 6, "bomb": 1, "brand_logo": 99, "caption_swap": 18, "cross_source_copy": 99,
                "empty_caption": 3, "exact_dup": 7, "http_404": 1, "near_dup_crop": 2, "near_dup_reencode": 2,
                "near_dup_resize": 1, "none": 120, "redirect": 3, "truncated": 1, "ui_glyph": 38},
    "openclipart": {"caption_swap": 3, "near_dup_crop": 1, "near_dup_resize": 1, "none": 36, "truncated": 1},
    "openmoji": {"boilerplate": 4, "caption_swap": 13, "empty_caption": 1, "exact_dup": 7, "near_dup_crop": 2,
                 "near_dup_reencode": 2, "near_dup_resize": 1, "none": 106, "not_image": 3, "truncated": 1},
    "tuxpaint": {"boilerplate": 1, "caption_swap": 3, "exact_dup": 1, "http_404": 1, "near_dup_crop": 2,
                 "near_dup_resize": 2, "non_english": 14, "none": 28, "oversized": 1, "redirect": 1},
    "twemoji": {"boilerplate": 3, "bomb": 1, "caption_swap": 12, "empty_caption": 2, "exact_dup": 5,
                "http_404": 1, "near_dup_crop": 1, "near_dup_reencode": 2, "near_dup_resize": 3, "none": 114,
                "oversized": 1, "truncated": 1},
}
EXPECTED_EVALSETS = {"emoji_heldout": 10, "icon_heldout": 12, "tuxpaint_heldout": 12, "openmoji_line": 40,
                     "fluent_contrast": 40, "iconset_shift": 20, "flag_styles": 28}

# The perceptual near-copy rule (curate/pool/offline/phash.py): a 256-bit DCT hash, near
# copies within NEAR_COPY_BITS bits. The sample is every in-domain evaluation image of the build
# against every decodable pool image.


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.unpackbits(np.bitwise_xor(a, b), axis=-1).sum(axis=-1)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    out = tmp_path_factory.mktemp("large_mini") / "pool"
    summary = build_offline(OfflinePoolConfig(out=out, seed=0, size="large-mini", progress=False))
    return out, summary


@pytest.fixture(scope="module")
def truth(mini) -> pd.DataFrame:
    return pd.read_parquet(mini[0] / "truth.parquet")


def _index(pool: Path, task: str) -> pd.DataFrame:
    return pd.read_parquet(pool / "evalsets" / task / "index.parquet")


def test_counts_by_source_and_noise_are_pinned(mini, truth):
    pool, summary = mini
    got = {s: dict(sorted(Counter(g.noise).items())) for s, g in truth.groupby("source")}
    assert got == EXPECTED_BY_SOURCE_AND_NOISE
    assert summary["counts"]["by_source_and_noise"] == EXPECTED_BY_SOURCE_AND_NOISE
    assert {t: v["n"] for t, v in summary["evalsets"].items()} == EXPECTED_EVALSETS
    assert len(set(truth.source)) >= 6
    urls = pd.read_parquet(pool / "urls.parquet")
    assert list(urls.url) == list(truth.url) and urls.url.is_unique and truth.uid.is_unique


def test_web_noise_rows_mean_what_they_say(truth):
    brand = truth[truth.noise == "brand_logo"]
    assert (brand.collection.isin(L.BRAND_SETS)).all()
    ui = truth[truth.noise == "ui_glyph"]
    assert ui.concept.map(lambda c: bool(set(c.split()) & L.UI_WORDS)).all()
    copies = truth[truth.noise == "cross_source_copy"]
    assert copies.collection.isin(list(L.COPY_SETS)).all()
    linked = copies[copies.duplicate_of.notna()]
    t = truth.set_index("uid")
    for _, r in linked.iterrows():  # points at the same art in its own package
        assert t.loc[r.duplicate_of].source == L.COPY_SETS[r.collection]
    bp = truth[truth.noise == "boilerplate"]
    assert len(bp) and (bp.text != bp.original_text).all()
    clean = truth[truth.noise == "none"]
    assert (clean.text == clean.original_text).all()


def test_every_row_records_package_version_and_licence_and_none_is_denied(mini, truth):
    pool, summary = mini
    for col in ("package", "package_version", "license"):
        assert truth[col].map(bool).all(), col
    recorded = summary["packages"]
    for (pkg, ver), _ in truth.groupby(["package", "package_version"]):
        assert recorded[pkg]["version"] == ver
        if pkg in PINS:
            assert PINS[pkg].version == ver and recorded[pkg]["tree_sha256"] == PINS[pkg].tree_sha256
    assert not truth.package.isin(list(DENIED_PACKAGES)).any()
    assert not truth.collection.isin(list(DENIED_ICONIFY_SETS)).any()
    assert not truth.collection.isin(list(L.POOL_EXCLUDED_SETS)).any()
    for r in truth.drop_duplicates(["package", "collection", "license"]).itertuples():
        check_allowed(r.package, r.collection, r.license, "pool")
    for task in V2_TASKS:
        idx = _index(pool, task)
        for r in idx.drop_duplicates(["package", "collection", "license"]).itertuples():
            check_allowed(r.package, r.collection, r.license, task)


def test_deny_list_is_enforced_in_code(mini, tmp_path, monkeypatch):
    for pkg, col, lic in [("@iconify/json", "cbi", "CC-BY-4.0"), ("@iconify/json", "ps", "MIT"),
                          ("emoji-datasource-apple", "", "MIT"), ("emoji-datasource-facebook", "", "MIT"),
                          ("@iconify/json", "some-set", "CC-BY-NC-4.0")]:
        with pytest.raises(CurateError, match="deny-list"):
            check_allowed(pkg, col, lic, "test")
    check_allowed("@iconify/json", "mdi", "Apache-2.0", "test")
    icons = {"icons": {"a": {"body": "<path d='M0 0h1v1z'/>"}}, "width": 1, "height": 1}
    assert L.read_iconify_set("cbi", icons, {}, tmp_path, {"name": "x", "version": "1"}, None, 0) == []

    real = L.read_large_sources

    def with_a_denied_icon(spec, seed):  # as if a reader let a non-commercial set through
        pool, style, packages = real(spec, seed)
        bad = L.read_iconify_set("mdi", icons, {"license": {"spdx": "MIT"}}, tmp_path,
                                 {"name": "@iconify/json", "version": "1"}, None, seed)
        for it in bad:
            it.meta["collection"], it.meta["web_kind"] = "cbi", "none"
        return pool + bad, style, packages

    monkeypatch.setattr("curate.pool.offline.build.read_large_sources", with_a_denied_icon)
    with pytest.raises(CurateError, match="deny-list"):
        build_offline(OfflinePoolConfig(out=tmp_path / "p", size="large-mini", progress=False))
    assert not (tmp_path / "p").exists()


def test_attribution_manifest_covers_every_attribution_licence(mini, truth):
    pool, _ = mini
    att = json.loads((pool / "ATTRIBUTION.json").read_text())
    listed = {(e["package"], e["version"], e["collection"], e["license"]): e["pool_rows"] for e in att["entries"]}
    need = truth[truth.license.map(needs_attribution)]
    assert {"CC-BY-4.0", "CC-BY-SA-4.0", "GPL-2.0-or-later"} <= set(need.license)
    want = {k: len(g) for k, g in need.groupby(["package", "package_version", "collection", "license"])}
    assert {k: v for k, v in listed.items() if v} == want
    assert all(e["author"] for e in att["entries"] if e["package"].startswith("@iconify"))
    md = (pool / "ATTRIBUTION.md").read_text()
    assert "CC-BY-SA-4.0" in md and "openmoji" in md


def test_trusted_subset_is_defined_by_source(mini, truth):
    pool, summary = mini
    trusted = pd.read_parquet(pool / "trusted.parquet")
    assert list(trusted.columns) == ["uid", "url", "text"]
    assert set(trusted.uid) == set(truth[truth.source.isin(L.TRUSTED_SOURCES)].uid)
    noise = Counter(truth.set_index("uid").loc[trusted.uid].noise)
    assert noise["none"] > 0 and noise["caption_swap"] > 0  # by source: its seeded noise stays in
    assert summary["trusted"]["rows"] == len(trusted)


def test_zero_shot_by_construction(mini, truth):
    pool, summary = mini
    served = {sha(p.read_bytes()) for p in (pool / "www").rglob("*") if p.is_file()}
    pool_concepts = set(truth.concept)
    ok = truth[truth.expected_status == "success"]
    pool_hashes = np.stack([dhash((pool / f).read_bytes()) for f in ok.file])
    # the perceptual hash sees real copies: at least 3/4 of the pool's resized and re-encoded
    # duplicates are within the threshold of their originals (a 64 px icon at JPEG quality 35 is not)
    t = truth.set_index("uid")
    rows = truth[truth.noise.isin(["near_dup_resize", "near_dup_reencode"])]
    bits = [int(hamming(dhash((pool / r.file).read_bytes()), dhash((pool / t.loc[r.duplicate_of].file).read_bytes())))
            for r in rows.itertuples()]
    assert len(bits) >= 10 and np.mean(np.array(bits) <= NEAR_COPY_BITS) >= 0.75, bits
    in_domain_checked = 0
    for task, (_ttype, group) in V2_TASKS.items():
        idx = _index(pool, task)
        for r in idx.itertuples():
            data = (pool / "evalsets" / task / r.image).read_bytes()
            assert sha(data) == r.sha256 and r.sha256 not in served, f"{task}: {r.source_id} is served"
            if group == "in_domain":
                assert r.concept not in pool_concepts, f"{task}: concept {r.concept!r} is in the pool"
                near = int(hamming(pool_hashes, dhash(data)).min())
                assert near > NEAR_COPY_BITS, f"{task}: {r.source_id} is a near copy of a pool image ({near} bits)"
                in_domain_checked += 1
            else:  # style shift: the concept is in the pool, the style (package style / icon set) is not
                assert r.concept in pool_concepts, f"{task}: style-shift concept {r.concept!r} not in the pool"
                assert not r.collection or r.collection not in set(truth.collection), f"{task}: {r.collection}"
    assert in_domain_checked == sum(EXPECTED_EVALSETS[t] for t, (_, g) in V2_TASKS.items() if g == "in_domain")
    # what the build dropped as copies (bytes, or perceptual for in-domain) is not in the pool
    dropped = summary["eval_copies_dropped"]
    assert str(NEAR_COPY_BITS) in dropped["rule"] and set(dropped) == {"rule", "byte_copies", "near_copies"}
    assert not set(dropped["near_copies"] + dropped["byte_copies"]) & {
        f"{s}:{i}" for s, i in zip(truth.source, truth.source_id)}


def test_concept_key_rule():
    assert concept_key("thumbs up: medium-dark skin tone") == concept_key("thumbs-up") == "thumb up"
    assert concept_key("mdi:bicycle-outline".split(":")[1]) == concept_key("Bicycles") == "bicycle"
    assert concept_key("weary face") == concept_key("face-weary") == concept_key("Weary Faces")
    assert concept_key("fluent:dentist-12-regular".split(":")[1]) == "dentist"
    assert concept_key("Café & Crème") == "and cafe creme"
    assert concept_key("24") == "24"  # nothing but a size token: keeps its raw token


def test_same_seed_same_bytes(mini, tmp_path):
    pool, _ = mini
    again = tmp_path / "again"
    build_offline(OfflinePoolConfig(out=again, seed=0, size="large-mini", progress=False))

    def digests(root: Path) -> dict[str, str]:
        return {p.relative_to(root).as_posix(): sha(p.read_bytes())
                for p in sorted(root.rglob("*")) if p.is_file() and p.name != "pool_build.json"}

    a, b = digests(pool), digests(again)
    assert len(a) > 900 and a == b
    ja, jb = (json.loads((d / "pool_build.json").read_text()) for d in (pool, again))
    for j in (ja, jb):
        j.pop("timings"), j.pop("render")
    assert ja == jb


def test_changed_or_missing_package_is_a_clear_error(tmp_path):
    src = node_modules() / "@iconify-json" / "pixelarticons"
    copy = tmp_path / "pixelarticons"
    shutil.copytree(src, copy)
    assert verify_package("@iconify-json/pixelarticons", copy)["tree_sha256"] == PINS["@iconify-json/pixelarticons"].tree_sha256
    (copy / "info.json").write_text("{}")  # a changed / partly written file
    with pytest.raises(CurateError, match=r"@iconify-json/pixelarticons@1\.2\.9 .*changed or partly installed.*make setup"):
        verify_package("@iconify-json/pixelarticons", copy)
    meta = json.loads((copy / "package.json").read_text())
    (copy / "package.json").write_text(json.dumps({**meta, "version": "9.9.9"}))
    with pytest.raises(CurateError, match="version 9.9.9, the large pool pins 1.2.9"):
        verify_package("@iconify-json/pixelarticons", copy)
    with pytest.raises(MissingDependencyError, match="openmoji@17.0.0"):
        verify_package("openmoji", tmp_path / "nowhere")


def test_missing_sources_via_cli_name_the_package(tmp_path, monkeypatch):
    installed = node_modules()
    monkeypatch.setenv("CURATE_DEPS", str(tmp_path / "empty"))
    r = CliRunner().invoke(main, ["pool", "build-offline", "--out", str(tmp_path / "p"), "--size", "large-mini"])
    assert r.exit_code == 2, r.output
    assert "openmoji@17.0.0" in r.output and "make setup" in r.output and "Traceback" not in r.output
    # only what `make setup` installs: `--size large` asks for the opt-in packages
    ci_only = tmp_path / "ci" / "node_modules"
    ci_only.mkdir(parents=True)
    for name in ("openmoji", "fluentui-emoji", "emoji-datasource-twitter"):
        (ci_only / name).symlink_to(installed / name)
    monkeypatch.setenv("CURATE_DEPS", str(tmp_path / "ci"))
    r = CliRunner().invoke(main, ["pool", "build-offline", "--out", str(tmp_path / "q"), "--size", "large"])
    assert r.exit_code == 2, r.output
    assert "emoji-datasource-google@16.0.0" in r.output and "make large-sources" in r.output


def test_evalsets_v2_build_with_chance_levels_and_groups(mini, tmp_path):
    pool, summary = mini
    out = tmp_path / "ev"
    res = E.build_offline(E.BuildOfflineConfig(out=out, pool_dir=pool, limit=200))
    v2 = json.loads((out / "offline_suite_v2.json").read_text())
    assert v2["headline"] == SUITE_V2_HEADLINE == SUITE_V2_GROUPS[IN_DOMAIN] + SUITE_V2_GROUPS[STYLE_SHIFT]
    assert set(v2["tasks"]) == set(OFFLINE_V2_KEYS) == set(SUITE_V2_REASONS)
    assert [t.key for t in resolve_tasks(["offline_v2"])] == OFFLINE_V2_KEYS
    assert "offline/digits" in SUITE_V2_GROUPS[OUT_OF_DOMAIN]
    for key in SUITE_V2_HEADLINE:
        task, name = TASKS[key], key.split("/", 1)[1]
        n = EXPECTED_EVALSETS.get(name, 200)  # animal_silhouettes: its own package, --limit 200
        assert res[key]["status"] == "built" and res[key]["n"] == n, key
        es = E.open_evalset(task, out)
        chance = v2["tasks"][key]["chance"]
        if task.type == "retrieval":
            assert es.dataset_type == "retrieval"
            assert chance["image_retrieval_recall@1"] == pytest.approx(1 / n)
            assert chance["image_retrieval_recall@5"] == pytest.approx(min(5, n) / n)
        else:
            classes = summary["evalsets"][name]["classes"] if name in summary["evalsets"] else 10
            assert len(es.classnames) == classes and es.templates
            assert chance["mean_per_class_recall"] == pytest.approx(1 / classes)
        assert chance["main"] == chance[task.main_metric]
        assert v2["tasks"][key]["group"] in (IN_DOMAIN, STYLE_SHIFT) and v2["tasks"][key]["reason"]
    assert v2["tasks"]["offline/digits"]["chance"]["acc1"] == pytest.approx(0.1)
