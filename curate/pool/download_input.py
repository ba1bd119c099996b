"""Read the URL table that `curate download` starts from, and decide per row whether it may be downloaded.

Input: a parquet, CSV/TSV or JSONL file (or a folder of such files, read in sorted order) with a URL
column and a caption column (names configurable). Output: one Arrow table row per input row, in input
order, with the uid and a pre-download verdict:

- `uid`: taken unchanged from a `uid` column when the input has one (DataComp's released metadata does;
  every value must be 32 lowercase hex characters, else the whole file is refused, naming the row), else
  derived from (url, text) by the uid contract (curate.core.uids.make_uid).
- `status` null means "download it"; otherwise a per-row rejection recorded in the pool metadata like any
  failure, so that every input row stays accounted for:
  `rejected_missing_field` (empty/missing URL or caption), `rejected_bad_url` (not http(s), no host, too
  long), `rejected_duplicate` (same (url, text) pair or same given uid as an earlier row).

Reading is pyarrow's (parquet/CSV/JSON readers); what is hand-written here is only the per-row policy,
which no library provides.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa

from curate.core.errors import CurateError
from curate.core.uids import is_uid, make_uid

ACCEPTED_SCHEMES = ("http", "https")
MAX_URL_CHARS = 8192
SUFFIXES = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
}

REJECTED_MISSING = "rejected_missing_field"
REJECTED_URL = "rejected_bad_url"
REJECTED_DUPLICATE = "rejected_duplicate"
REJECTION_STATUSES = (REJECTED_MISSING, REJECTED_URL, REJECTED_DUPLICATE)
BBOX_TYPE_NAME = "face_bboxes"
BBOX_TYPE = pa.list_(pa.list_(pa.float64()))


@dataclass(frozen=True)
class InputColumns:
    """Which input columns hold the URL, the caption and (optionally) a given uid."""

    url: str = "url"
    text: str = "text"
    uid: str = "uid"
    bbox: str = "face_bboxes"  # DataComp's face boxes (relative [x1, y1, x2, y2]); carried when present


@dataclass
class InputTable:
    """The checked input: `table` has columns uid, url, text, status, error_message (input order)."""

    table: pa.Table
    files: list[Path]
    sha256: str
    uids_given: bool

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    @property
    def has_bboxes(self) -> bool:
        return BBOX_TYPE_NAME in self.table.column_names


def input_files(path: str | os.PathLike) -> list[Path]:
    """The file itself, or the supported files of a folder in sorted order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise CurateError(f"{path}: folder has no input files ({', '.join(sorted(SUFFIXES))})")
        return files
    if not path.exists():
        raise CurateError(f"{path}: no such file")
    if path.suffix.lower() not in SUFFIXES:
        raise CurateError(f"{path}: unsupported input format {path.suffix!r}; use one of {', '.join(sorted(SUFFIXES))}")
    return [path]


def hash_files(files: list[Path]) -> str:
    """sha256 over the input files' bytes (and names), so a changed input is never mistaken for the same one."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _read_one(path: Path, cols: InputColumns) -> pa.Table:
    kind = SUFFIXES[path.suffix.lower()]
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
            wanted = [c for c in (cols.url, cols.text, cols.uid, cols.bbox) if c in names]
            table = pq.read_table(path, columns=wanted)
        elif kind in ("csv", "tsv"):
            import pyarrow.csv as pcsv

            # Read every column as text: a caption like "1990" must not become an int.
            with open(path, "rb") as fh:
                header = fh.readline().decode("utf-8", "replace")
            delim = "\t" if kind == "tsv" else ","
            guessed = [h.strip().strip('"') for h in header.rstrip("\r\n").split(delim)]
            table = pcsv.read_csv(
                path,
                parse_options=pcsv.ParseOptions(delimiter=delim, newlines_in_values=True),
                convert_options=pcsv.ConvertOptions(
                    column_types={c: pa.string() for c in guessed}, strings_can_be_null=False
                ),
            )
        else:
            import pyarrow.json as pjson

            table = pjson.read_json(path)
    except pa.ArrowInvalid as e:
        if "Empty CSV file" in str(e) or path.stat().st_size == 0:
            raise CurateError(f"{path}: the file is empty (expected a header with columns {cols.url!r}, {cols.text!r})") from None
        raise CurateError(f"{path}: cannot be read as {kind}: {e}") from None
    except OSError as e:
        raise CurateError(f"{path}: cannot be read: {e}") from None
    missing = [c for c in (cols.url, cols.text) if c not in table.column_names]
    if missing:
        raise CurateError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))}; it has {table.column_names}. "
            "Name the right ones with --url-col / --text-col."
        )
    out = {"url": table[cols.url], "text": table[cols.text]}
    if cols.uid in table.column_names:
        out["uid"] = table[cols.uid]
    t = pa.table({k: _as_string(v, path, k) for k, v in out.items()})
    if cols.bbox in table.column_names:
        t = t.append_column(BBOX_TYPE_NAME, _as_bboxes(table[cols.bbox], path, cols.bbox))
    return t


def _as_bboxes(col: pa.ChunkedArray, path: Path, name: str) -> pa.ChunkedArray:
    """Face boxes as list<list<float64>>, each box 4 numbers (DataComp: relative x1, y1, x2, y2)."""
    import pyarrow.compute as pc

    try:
        col = col.cast(BBOX_TYPE)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise CurateError(f"{path}: column {name!r} has type {col.type}, expected a list of [x1, y1, x2, y2] "
                          "boxes (list<list<float>>)") from None
    for chunk_start, chunk in _chunks(col):
        boxes = pc.list_flatten(chunk)
        bad = pc.not_equal(pc.list_value_length(boxes), 4)
        if pc.any(bad).as_py():
            owner = pc.list_parent_indices(chunk).to_numpy()
            first = int(owner[pc.index(bad, True).as_py()])
            raise CurateError(f"{path}: row {chunk_start + first} of column {name!r} has a box that is not "
                              "[x1, y1, x2, y2]")
    return col


def _chunks(col: pa.ChunkedArray):
    start = 0
    for chunk in col.chunks:
        yield start, chunk
        start += len(chunk)


def _as_string(col: pa.ChunkedArray, path: Path, name: str) -> pa.ChunkedArray:
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col.cast(pa.string())
    if pa.types.is_null(col.type):
        return pa.chunked_array([pa.nulls(len(col), pa.string())])
    try:
        return col.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise CurateError(f"{path}: column {name!r} has type {col.type}, expected text") from None


def url_problem(url: str) -> str | None:
    """Why this URL may not be downloaded, or None. Only http(s) URLs with a host pass."""
    if len(url) > MAX_URL_CHARS:
        return f"URL is longer than {MAX_URL_CHARS} characters"
    if any(ord(c) < 33 for c in url):
        return "URL contains whitespace or control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as e:
        return f"URL cannot be parsed: {e}"
    if parts.scheme.lower() not in ACCEPTED_SCHEMES:
        return f"URL scheme {parts.scheme or '(none)'!r} is not http or https"
    if not parts.hostname:
        return "URL has no host"
    return None


def read_input(path: str | os.PathLike, cols: InputColumns = InputColumns()) -> InputTable:
    """Read and check the URL table; per-row problems become rejections, file-level ones a CurateError."""
    files = input_files(path)
    tables = [_read_one(f, cols) for f in files]
    uids_given = all("uid" in t.column_names for t in tables)
    if not uids_given and any("uid" in t.column_names for t in tables):
        raise CurateError(f"{path}: some input files have a {cols.uid!r} column and some do not")
    if len({BBOX_TYPE_NAME in t.column_names for t in tables}) > 1:
        raise CurateError(f"{path}: some input files have a {cols.bbox!r} column and some do not")
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if table.num_rows == 0:
        raise CurateError(f"{path}: has no rows")

    urls = table["url"].to_pylist()
    texts = table["text"].to_pylist()
    given = table["uid"].to_pylist() if uids_given else None
    n = len(urls)
    uids: list[str] = [""] * n
    status: list[str | None] = [None] * n
    errors: list[str | None] = [None] * n
    seen_pairs: dict[tuple[str, str], int] = {}
    seen_uids: dict[str, int] = {}
    for i in range(n):
        url, text = urls[i], texts[i]
        if given is not None:
            u = given[i]
            if not is_uid(u):
                raise CurateError(
                    f"{path}: row {i} has {cols.uid!r} = {u!r}, expected 32 lowercase hex characters. "
                    f"Fix the column, or rename/drop it to let curate derive uids from (url, text)."
                )
        else:
            u = make_uid(url or "", text or "")
        uids[i] = u
        if not url or not text or not url.strip() or not text.strip():
            status[i] = REJECTED_MISSING
            errors[i] = "empty or missing " + ("URL" if not (url and url.strip()) else "caption")
            continue
        problem = url_problem(url)
        if problem:
            status[i], errors[i] = REJECTED_URL, problem
            continue
        first = seen_pairs.setdefault((url, text), i)
        if first != i:
            status[i], errors[i] = REJECTED_DUPLICATE, f"same (url, text) as row {first}"
            continue
        first = seen_uids.setdefault(u, i)
        if first != i:
            status[i], errors[i] = REJECTED_DUPLICATE, f"same uid as row {first}"
    out = pa.table(
        {
            "uid": pa.array(uids, pa.string()),
            "url": pa.array(urls, pa.string()),
            "text": pa.array(texts, pa.string()),
            "status": pa.array(status, pa.string()),
            "error_message": pa.array(errors, pa.string()),
        }
    )
    if BBOX_TYPE_NAME in table.column_names:
        out = out.append_column(BBOX_TYPE_NAME, table[BBOX_TYPE_NAME])
    return InputTable(table=out, files=files, sha256=hash_files(files), uids_given=uids_given)
