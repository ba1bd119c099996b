"""Pinned source packages of the large offline pool, their licences, and the deny-list.

Why pins: "same seed, same bytes" only holds for the same source files, and a pool whose rows
cannot be traced to an exact package version cannot be redistributed or attributed. Every npm
package the large pool reads is pinned here by version and by a tree hash (sha256 over the sorted
(relative path, sha256 of content) of exactly the files the pool reads). A missing package, another
version, or a partly installed one (a file missing or changed) is a clear error naming the package
and the command that installs it. Debian sources cannot be pinned the same way (a point release
changes them); their dpkg version and tree hash are recorded in pool_build.json instead.

The deny-list (DENIED_*) names art that is not freely licensed. It is enforced twice: the readers
never read it, and `check_allowed` runs on every pool row and evaluation item before anything is
written, so a denied item fails the build instead of shipping.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from curate.core.errors import CurateError, MissingDependencyError

# ------------------------------------------------------------------ deny-list

DENIED_ICONIFY_SETS: dict[str, str] = {
    "cbi": "Custom Brand Icons: CC BY-NC-SA 4.0 (non-commercial)",
    "ps": "PrestaShop Icons: non-commercial licence",
}
DENIED_PACKAGES: dict[str, str] = {
    "emoji-datasource-apple": "Apple emoji art is not freely licensed",
    "emoji-datasource-facebook": "Facebook emoji art is not freely licensed",
}
# iconify sets that are copies of the denied vendors' art, should a later @iconify/json add them
DENIED_COLLECTION_WORDS = ("apple", "facebook")


def check_allowed(package: str, collection: str, license: str, where: str) -> None:
    """Raise CurateError if (package, iconify collection, SPDX licence) is on the deny-list."""
    why = DENIED_PACKAGES.get(package) or DENIED_ICONIFY_SETS.get(collection)
    if not why and collection and any(w in collection for w in DENIED_COLLECTION_WORDS):
        why = f"collection {collection!r} is vendor emoji art"
    if not why and "NC" in license.upper().replace("-", " ").split():
        why = f"licence {license} is non-commercial"
    if why:
        raise CurateError(f"{where}: {package}{':' + collection if collection else ''} is on the deny-list ({why})")


# ------------------------------------------------------------------ licences that need attribution

ATTRIBUTION_PREFIXES = ("CC-BY", "GPL", "LGPL", "AGPL", "OFL", "Apache")


def needs_attribution(spdx: str) -> bool:
    """CC-BY*, CC-BY-SA*, (L/A)GPL*, OFL and Apache licences require naming the author/licence."""
    return any(spdx.upper().startswith(p.upper()) for p in ATTRIBUTION_PREFIXES)


# ------------------------------------------------------------------ npm pins


@dataclass(frozen=True)
class Package:
    """One pinned npm package: what the large pool reads from it and its expected tree hash."""

    name: str
    version: str
    license: str            # SPDX of the art (iconify: per set, read from the set's info)
    files: tuple[str, ...]  # fnmatch patterns relative to the package root
    tree_sha256: str
    optin: bool = False     # installed by `make large-sources`, not by `make setup`

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def install(self) -> str:
        target = "make large-sources" if self.optin else "make setup"
        return f"{target}   (runs: npm install --prefix .deps {self.spec})"


def _iconify_set(prefix: str, version: str, license: str, tree: str) -> Package:
    return Package(f"@iconify-json/{prefix}", version, license, ("icons.json", "info.json"), tree)


PINS: dict[str, Package] = {p.name: p for p in [
    Package("emoji-datasource-twitter", "16.0.0", "CC-BY-4.0", ("emoji.json", "img/twitter/64/*.png"),
            "127d989937f8ff346bd7157b2972dc5c0056b6cce12bcece604a865d420d4d13"),
    Package("openmoji", "17.0.0", "CC-BY-SA-4.0", ("data/openmoji.json", "color/svg/*.svg", "black/svg/*.svg"),
            "2d7e0f38a9958ece75df508f62d988dc0ed9f4c1875259ae83724e049f50684d"),
    Package("fluentui-emoji", "1.3.0", "MIT", ("icons/flat/*.svg", "icons/high-contrast/*.svg"),
            "79d0555ea5117031caab7e934867db3f4a069ff085bf5fa2dea3564ef5781e37"),
    Package("emoji-datasource-google", "16.0.0", "Apache-2.0", ("emoji.json", "img/google/64/*.png"),
            "320141d4aa1b55c29d4d0fae23b95be445594b7e530c0ac09a907e0e26f509e5", optin=True),
    Package("@iconify/json", "2.2.535", "per set", ("json/*.json",), "31accfce7daf1f529e95a1a39826b96eb4c947959c82d1a286791685dc65a9cd", optin=True),
    _iconify_set("game-icons", "1.2.4", "CC-BY-3.0", "def2ae0f4616bb14b65ca41e52ca22e5bbd502a4bfa23f5a476c65cc7dcbad80"),
    _iconify_set("mdi", "1.2.3", "Apache-2.0", "e30809ce561dbd6765133b6c1e3d9c2e042baa3082eca5d9588f250198d23733"),
    _iconify_set("simple-icons", "1.2.103", "CC0-1.0", "7df57a329446fbc97676b5bdf57d9a1f7bcf0d64c9faddd382299d12ecf82bcf"),
    _iconify_set("twemoji", "1.2.5", "CC-BY-4.0", "bbdb0afca6df04d865fc0abf6ae596c6ca34484dd2a4bdff459048e555c1fba8"),
    _iconify_set("flag", "1.2.12", "MIT", "07a124d1bedbccb9c1ea4277c6a3fc6443c853c5a3f29e6e5120a0f555e542f3"),
    _iconify_set("circle-flags", "1.2.11", "MIT", "05f9d89a8368a9314cbf890282a8e1252574c3b74fdbbeae137394270d4751dc"),
    _iconify_set("fluent-emoji-high-contrast", "1.2.6", "MIT", "4c34d623c2bd2b806b051992deda8ebe6465ae84c2d032716141f70002b63aa8"),
    _iconify_set("pixelarticons", "1.2.9", "MIT", "4e2c310c4f1d98bda133d10588412032fbf4388988c7866145dfbce725d3defa"),
]}

# The per-set iconify packages `make setup` installs (CI: ~9 MB); `make large-sources` adds the
# complete @iconify/json (104 MB download, 464 MB unpacked) that `--size large` reads instead.
CI_ICONIFY_SETS = tuple(n.split("/", 1)[1] for n in PINS if n.startswith("@iconify-json/"))


def node_modules() -> Path:
    from curate.pool.offline.sources import deps_dir

    return deps_dir() / "node_modules"


def package_files(root: Path, patterns: tuple[str, ...]) -> list[str]:
    """Relative paths under `root` matching `patterns` (only the folders the patterns name are listed)."""
    out: set[str] = set()
    for pat in patterns:
        folder, _, leaf = pat.rpartition("/")
        if folder == "**":  # any depth (Debian trees)
            out.update(p.relative_to(root).as_posix() for p in root.rglob(leaf) if p.is_file())
            continue
        base = root / folder if folder else root
        if not base.is_dir():
            continue
        for name in os.listdir(base):
            if fnmatch.fnmatchcase(name, leaf) and (base / name).is_file():
                out.add(f"{folder}/{name}" if folder else name)
    return sorted(out)


def tree_sha256(root: Path, files: list[str]) -> str:
    """sha256 over "relpath NUL sha256(content) LF" for each file, in sorted order."""
    h = hashlib.sha256()
    for rel in files:
        h.update(f"{rel}\0{hashlib.sha256((root / rel).read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def verify_package(name: str, root: Path | None = None) -> dict:
    """Check an installed pinned package; return {name, version, license, tree_sha256, files, root}.

    Raises MissingDependencyError (not installed) or CurateError (other version, changed or partly
    installed files), both naming the package and its install command.
    """
    pin = PINS[name]
    root = Path(root) if root is not None else node_modules() / name
    meta = root / "package.json"
    if not meta.is_file():
        raise MissingDependencyError(f"npm package {pin.spec} (expected at {root})", pin.install)
    try:
        version = json.loads(meta.read_text(encoding="utf-8")).get("version")
    except ValueError as e:
        raise CurateError(f"{meta}: unreadable package.json ({e}); reinstall {pin.spec} with: {pin.install}") from None
    if version != pin.version:
        raise CurateError(f"npm package {name} at {root} is version {version}, the large pool pins {pin.version}: "
                          f"install the pinned one with: {pin.install}")
    files = package_files(root, pin.files)
    tree = tree_sha256(root, files)
    if tree != pin.tree_sha256:
        raise CurateError(f"npm package {pin.spec} at {root} is changed or partly installed ({len(files)} files read, "
                          f"tree sha256 {tree[:16]}..., pinned {pin.tree_sha256[:16]}...): reinstall it with: "
                          f"rm -rf {root} && {pin.install}")
    return {"name": name, "version": version, "license": pin.license, "tree_sha256": tree, "files": len(files),
            "root": str(root)}


def debian_package(name: str, root: Path, patterns: tuple[str, ...]) -> dict:
    """Record (not pin) a Debian source: its dpkg version and the tree hash of the files read."""
    try:
        version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True,
                                 check=False).stdout.strip() or "unknown"
    except OSError:
        version = "unknown"
    files = package_files(root, patterns)
    return {"name": name, "version": version, "tree_sha256": tree_sha256(root, files), "files": len(files),
            "root": str(root), "pinned": False}
