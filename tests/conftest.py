"""Shared pytest fixtures.

- `serve_dir(directory) -> base_url`: serve any directory that has (or will have) a www/ subfolder on
  a free loopback port for the rest of the test.
- `offline_pool_small`: a real offline pool (`curate pool build-offline --size small`), built once per
  test session into a temp dir and served for the whole session. The pool is built with the server's
  actual free port as its base URL, so parallel sessions never collide. Treat it as read-only: copy it
  (shutil.copytree) if a test must modify it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@pytest.fixture(scope="session", autouse=True)
def _eval_decode_cache(tmp_path_factory):
    """Evaluations in tests use a session folder as their decode cache (benchmark/decode_cache.py), never the
    user's ~/.cache/curate/eval (subprocesses inherit it through the environment)."""
    old = os.environ.get("CURATE_EVAL_CACHE")
    os.environ["CURATE_EVAL_CACHE"] = str(tmp_path_factory.mktemp("eval_decode_cache"))
    yield
    if old is None:
        os.environ.pop("CURATE_EVAL_CACHE", None)
    else:
        os.environ["CURATE_EVAL_CACHE"] = old


@pytest.fixture
def serve_dir():
    """Factory: `base_url = serve_dir(path)` serves path/www until the test ends."""
    from curate.pool.serve import running_server

    with contextlib.ExitStack() as stack:

        def _serve(directory: str | os.PathLike) -> str:
            return stack.enter_context(running_server(directory, port=0))

        yield _serve


@dataclass(frozen=True)
class ServedPool:
    path: Path          # the pool directory: urls.parquet, truth.parquet, www/, evalsets/, pool_build.json
    base_url: str       # where it is being served; every URL in urls.parquet starts with it
    summary: dict       # what build_offline returned

    @property
    def urls(self) -> Path:
        return self.path / "urls.parquet"

    @property
    def truth(self) -> Path:
        return self.path / "truth.parquet"


@pytest.fixture(scope="session")
def offline_pool_small(tmp_path_factory) -> ServedPool:
    """A small offline pool (~1,500 rows), built once per session and served on a free port."""
    from curate.pool.offline.build import OfflinePoolConfig, build_offline
    from curate.pool.serve import running_server

    pool = tmp_path_factory.mktemp("offline_pool") / "pool"
    # Start the server first (port 0 = free port), then build with that exact base URL: the server
    # resolves DIR/www per request, so it can start before the pool exists.
    with running_server(pool, port=0) as base_url:
        summary = build_offline(OfflinePoolConfig(out=pool, seed=0, size="small", base_url=base_url))
        yield ServedPool(path=pool, base_url=base_url, summary=summary)
