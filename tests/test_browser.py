"""The HTML pages render in a real browser: `leaderboard.html` and a filter `report.html` opened in headless
Chromium (Debian's chromium + chromium-driver, driven by selenium), every image decoded (naturalWidth > 0) and
as many plots as the page should have.

Why a browser: the pages inline their plots as base64 PNGs, and a truncated or mis-encoded data URI still
looks fine to a regex over the HTML; only a browser decoding it says the reader sees a plot.

Installed for tests only (`make test-deps`: apt chromium chromium-driver, selenium from the `dev` extra).
Without them the tests skip with the reason, except under CI=true, where they fail: CI must run them.
CI cost: ~10 s (one browser start, a small leaderboard and a small filter run).
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
import textwrap
from pathlib import Path

import pytest

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _missing() -> list[str]:
    out = []
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        out.append("chromium (apt-get install chromium)")
    if not shutil.which("chromedriver"):
        out.append("chromedriver (apt-get install chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        out.append("selenium (pip install -e '.[dev]')")
    return out


def require_browser() -> None:
    """Skip (naming what is missing and how to install it) when the browser is absent; fail under CI=true."""
    missing = _missing()
    if missing:
        why = f"headless browser test needs {', '.join(missing)}; `make test-deps` installs them"
        if _in_ci():
            pytest.fail(f"CI=true: {why}", pytrace=False)
        pytest.skip(why)


@pytest.fixture(scope="module")
def browser():
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="curate-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for f in FLAGS:
        opts.add_argument(f)
    opts.add_argument(f"--user-data-dir={profile}")
    # explicit driver path: selenium never runs selenium-manager (which would try to download a driver)
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def images(driver, page: Path) -> list[dict]:
    """Open `page` and return each <img>'s decode state once the page and its images have loaded."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(page.resolve().as_uri())
    WebDriverWait(driver, 20).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"))
    return driver.execute_script(
        "return Array.from(document.images).map(i => ({alt: i.alt, width: i.naturalWidth, height: i.naturalHeight}))")


def test_checker_sees_a_broken_image(browser, tmp_path):
    """The check can fail: a PNG with a mangled signature, or cut before its header, does not decode
    (naturalWidth 0). (A PNG cut after its header keeps its size: the check catches undecodable images.)"""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, 1])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    good = base64.b64encode(buf.getvalue()).decode()
    data = buf.getvalue()
    mangled = base64.b64encode(b"\0" * 8 + data[8:]).decode()
    cut = base64.b64encode(data[:20]).decode()
    page = tmp_path / "p.html"
    page.write_text(f"<html><body><img alt='good' src='data:image/png;base64,{good}'>"
                    f"<img alt='mangled' src='data:image/png;base64,{mangled}'>"
                    f"<img alt='cut' src='data:image/png;base64,{cut}'></body></html>")
    got = {i["alt"]: i["width"] for i in images(browser, page)}
    assert got == {"good": 200, "mangled": 0, "cut": 0}


def test_leaderboard_html_plots_all_decode(browser, tmp_path, monkeypatch):
    from benchmark import leaderboard as lb
    from benchmark.submit import SubmitConfig, submit
    from tests.run_factory import make_run, make_subset

    monkeypatch.setenv("CURATE_EVALSETS", str(tmp_path / "no_evalsets"))
    db = tmp_path / "lb.duckdb"
    uids = [f"{i:032x}" for i in range(1, 30)]
    keys = ["vtab/cifar100", "vtab/dtd", "imagenet1k", "cifar10", "offline/digits"]
    for r, (name, base, seeds) in enumerate((("strong", 0.3, 3), ("weak", 0.1, 3), ("single", 0.2, 1))):
        subset = make_subset(tmp_path / f"s_{name}", uids[: 10 + 5 * r], name=name)
        for seed in range(seeds):
            scores = {k: base + 0.01 * seed + 0.02 * i for i, k in enumerate(keys)}
            submit(SubmitConfig(run=make_run(tmp_path / f"r_{name}_{seed}", subset, seed=seed, scores=scores),
                                leaderboard_db=db, tarball=False))
    out = lb.write_html(db, tmp_path / "leaderboard.html")
    expected = 3 + len(lb.task_groups(keys))  # average, per task, seed spread + one per task group
    assert expected == 6  # vtab, imagenet, out_of_domain
    got = images(browser, out)
    assert len(got) == expected, got
    assert all(i["width"] > 0 and i["height"] > 0 for i in got), got


def test_filter_report_html_plots_all_decode(browser, tmp_path):
    from curate.filter.engine import FilterConfig, filter_pool
    from tests.metadata_factory import write_embeddings, write_metadata

    model = "curate-debug__0123456789ab"
    pool = tmp_path / "pool"
    write_metadata(pool, n_rows=600, n_files=2, seed=3)
    write_embeddings(pool, model, dim=16, seed=4)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent("""\
        name: basic_clip
        steps:
          - basic: {}
          - clip_score: {model: curate-debug, keep_top_fraction: 0.3}
        """))
    filter_pool(FilterConfig(recipe=str(recipe), pool=str(pool), out=str(tmp_path / "out"), progress=False, workers=1))
    got = images(browser, tmp_path / "out" / "report.html")
    assert len(got) == 2, got  # the funnel and the clip_score histogram (this pool has no images to show)
    assert all(i["width"] > 0 and i["height"] > 0 for i in got), got


def test_absent_browser_skips_locally_and_fails_in_ci(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="chromium .*chromedriver.*make test-deps"):
        require_browser()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_browser()
