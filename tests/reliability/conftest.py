"""Everything under tests/reliability/ carries the `reliability` marker, so the suite runs on its own:

    .venv/bin/python -m pytest -m reliability          # just this suite
    .venv/bin/python -m pytest -m "not slow"           # CI's quick pass still includes it

Shared helpers are in tests/reliability/helpers.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.reliability)

