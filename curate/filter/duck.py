"""DuckDB helpers the filter engine and its report share: SQL string quoting, run-and-consume, content keys."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any


def sql_str(s: str | os.PathLike) -> str:
    """A SQL string literal (single quotes doubled), for paths and names spliced into DuckDB statements."""
    return "'" + str(s).replace("'", "''") + "'"


def run_sql(con, sql: str) -> list[tuple]:
    """Execute and fully consume a statement (DuckDB 2 refuses new work while a result is pending)."""
    return con.execute(sql).fetchall()


def stable_hash(obj: Any) -> str:
    """A short content key of a JSON-able object (sorted keys), used to name cached step files."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]
