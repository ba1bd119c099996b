"""`curate download`: URL table -> POOL/ (webdataset shards + per-shard metadata), on Ray, with img2dataset.

Layout written (docs/FORMATS.md, "Pools"):

    POOL/shards/{shard:08d}.tar          {key}.jpg {key}.txt {key}.json (json carries the uid)
    POOL/shards/sizes.json               {"00000000.tar": successes, ...}: DataComp's resharder's shard table
    POOL/metadata/{shard:08d}.parquet    one row per input row of that shard, success or not
    POOL/pool.json                       counts by status, input hash, settings, versions, timings

How the work is split, and why:
- Shard k holds input rows [k*S, (k+1)*S). A row's key is its position (shard digits + position
  digits, img2dataset's key format), never anything derived from the row's text.
- One Ray task per shard (our own tasks, not img2dataset's `ray_distributor`): that distributor
  submits everything and blocks in one `ray.get`, so there is no progress, no bound on in-flight
  shards, and its outputs (`00000.tar`, `00000.parquet`, `_stats.json`) are written in place,
  non-atomically, under img2dataset's names. Each of our tasks runs img2dataset's own `Downloader`
  (its thread pool, `Resizer` and `WebDatasetSampleWriter`) on one shard into a private staging
  folder, then converts the result to the contract layout: the tar is rewritten in key order with our
  json (uid, key, text, sizes, sha256) and renamed into place, then the metadata parquet is renamed into
  place. The metadata file is the shard's completion marker; it records the tar's size, so a shard
  whose tar and metadata disagree (a kill between the two renames) is redone.
- Every failed row says whether its failure is worth retrying: its `error_message` starts with
  `transient: ` (5xx, 429, 408, a reset or dropped connection, a timeout, a stall or a trickle past the
  deadline, a refused connection, a temporary DNS failure) or `permanent: ` (any other 4xx, a redirect
  loop or too many hops, a body over the cap, X-Robots-Tag opt-out, bytes that are not an image, a name
  that does not resolve, a certificate that does not verify). `classify_failure` is the one rule.
- `--retry-failed` re-runs only the transient failures of finished shards (and rows of older pools,
  whose messages have no class) and rewrites each such shard (old successes + new ones) with the same two
  atomic renames. `--retry-permanent` also re-requests the permanent ones (a site that was fixed).
- Safety the library lacks: img2dataset's `download_image` reads an unbounded body with urllib's
  default opener (file:// and ftp:// handlers, 10 redirects, no byte cap), and cv2 decodes any image
  below 2**30 pixels. While a shard runs, `download_image` is replaced by `_fetch` (http/https only,
  capped bytes, capped redirects, whole-request deadline) and the resizer first reads the image
  header with PIL and refuses images above the pixel cap before anything is decoded.
- The address guard (curate.core.address_guard): `_fetch` connects only to globally routable addresses it
  resolved and checked itself, for the URL and for every redirect. A blocked row is recorded as
  `rejected_bad_url` with the guard's reason in `error_message`; pool.json counts them under
  `address_guard.blocked_rows`. `--allow-loopback` / `--allow-cidr` widen the policy (run settings, not
  content: `--retry-failed` re-checks blocked rows, so a rerun with a wider policy fetches them).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import shutil
import sys
import tarfile
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
DEFAULT_MAX_PIXELS = 64_000_000
# cv2 reads this once when it loads; it is a second line of defence behind the PIL header check.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(DEFAULT_MAX_PIXELS))

import click  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from curate.core.atomic import TEMP_PREFIX, atomic_path, cleanup_temp_files, write_json, write_parquet  # noqa: E402
from curate.pool.download_input import REJECTED_URL, InputColumns, InputTable, read_input  # noqa: E402
from curate.core.address_guard import BLOCKED_PREFIX, AddressGuard, LimitedRedirects, blocked_reason  # noqa: E402
from curate.core.errors import CurateError  # noqa: E402
from curate.core.stage import StageSummary, versions  # noqa: E402

POOL_FORMAT = "curate-pool/1"
FAILED_STATUSES = ("failed_to_download", "failed_to_resize")
TRANSIENT_PREFIX = "transient: "  # error_message of a failed row worth retrying (docs/FORMATS.md, "Pool metadata")
PERMANENT_PREFIX = "permanent: "  # ... and of one that a retry would fail the same way
TRANSIENT, PERMANENT = "transient", "permanent"
TAR_BYTES_KEY = b"curate.tar_bytes"
USER_AGENT_TOKEN = "curate"
# img2dataset's default: respect X-Robots-Tag opt-outs.
DISALLOWED_HEADER_DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]

METADATA_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("url", pa.string()),
        ("text", pa.string()),
        ("shard", pa.int32()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("sha256", pa.string()),
    ]
)


@dataclass
class DownloadConfig:
    """Everything `download()` needs. Fields in `CONTENT_FIELDS` define the pool's content: a resumed run
    must use the same values (or --overwrite); the others (speed, caps, timeouts) may change between runs."""

    urls: Path
    out: Path
    url_col: str = "url"
    text_col: str = "text"
    uid_col: str = "uid"
    bbox_col: str = "face_bboxes"
    blur_faces: bool | None = None  # None = blur when the input has a face-box column (DataComp's default)
    shard_size: int = 10_000
    image_size: int = 256
    resize_mode: str = "border"
    resize_only_if_bigger: bool = False
    encode_quality: int = 95
    processes: int | None = None  # shards in flight; None = the CPUs Ray (or the machine) has
    threads: int = 64  # download threads per shard
    timeout: float = 10.0  # seconds for a whole request (connect, headers and body)
    retries: int = 0
    max_bytes: int = 16 << 20
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_redirects: int = 5
    allow_loopback: bool = False  # the address guard allows 127.0.0.0/8 and ::1 (the offline demo, tests)
    allow_cidrs: tuple[str, ...] = ()  # networks the address guard allows besides global addresses
    distributor: str = "ray"  # "ray" or "multiprocessing"
    ray_address: str | None = None
    retry_failed: bool = False
    retry_permanent: bool = False  # with retry_failed: re-request permanent failures too
    overwrite: bool = False
    progress: bool | None = None  # None = when stderr is a terminal
    echo: bool = True

    CONTENT_FIELDS = ("url_col", "text_col", "uid_col", "shard_size", "image_size", "resize_mode",
                      "resize_only_if_bigger", "encode_quality", "blur_faces")

    def __post_init__(self) -> None:
        self.urls, self.out = Path(self.urls), Path(self.out)
        if self.shard_size < 1:
            raise CurateError(f"--shard-size must be at least 1, got {self.shard_size}")
        if self.image_size < 1:
            raise CurateError(f"--image-size must be at least 1, got {self.image_size}")
        if self.distributor not in ("ray", "multiprocessing"):
            raise CurateError(f"--distributor must be ray or multiprocessing, got {self.distributor!r}")
        if self.processes is not None and self.processes < 1:
            raise CurateError(f"--processes must be at least 1, got {self.processes}")
        if self.threads < 1 or self.max_bytes < 1 or self.max_pixels < 1 or self.max_redirects < 0:
            raise CurateError("--threads, --max-bytes and --max-pixels must be positive, --max-redirects >= 0")
        self.allow_cidrs = self.guard().allow_cidrs  # validated and normalised (a bad CIDR is a CurateError)

    def guard(self) -> AddressGuard:
        return AddressGuard(allow_loopback=bool(self.allow_loopback), allow_cidrs=tuple(self.allow_cidrs or ()))

    def content(self) -> dict:
        return {k: getattr(self, k) for k in self.CONTENT_FIELDS}


@dataclass
class ShardJob:
    """One unit of work: download `todo` positions of shard `shard` and (re)write that shard."""

    shard: int
    pool: str
    rows: pa.Table  # the shard's input slice: uid, url, text, status, error_message
    todo: list[int]  # positions (within the shard) to download
    merge: bool  # keep the existing shard's other rows and samples (--retry-failed)
    settings: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# keys and paths


def key_digits(shard_size: int) -> int:
    """Digits of the position part of a key (img2dataset's oom_sample_per_shard)."""
    return max(1, math.ceil(math.log10(shard_size))) if shard_size > 1 else 1


def make_key(shard: int, pos: int, shard_size: int) -> str:
    return f"{shard:08d}{pos:0{key_digits(shard_size)}d}"


def shard_paths(pool: Path, shard: int) -> tuple[Path, Path]:
    return pool / "shards" / f"{shard:08d}.tar", pool / "metadata" / f"{shard:08d}.parquet"


def shard_is_done(pool: Path, shard: int) -> bool:
    """A shard is done when its metadata exists and the tar it records is the tar on disk."""
    tar, meta = shard_paths(pool, shard)
    if not meta.exists() or not tar.exists():
        return False
    try:
        kv = pq.read_schema(meta).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return False
    return kv.get(TAR_BYTES_KEY) == str(tar.stat().st_size).encode()


# --------------------------------------------------------------------------------------------------
# safe fetching and decoding, installed into img2dataset while a shard runs

_LIMITS = {"max_bytes": 16 << 20, "max_redirects": 5, "guard": AddressGuard()}


def _opener(max_redirects: int, guard: AddressGuard) -> urllib.request.OpenerDirector:
    """An opener with only http(s) handlers (no file://, ftp:// or data:, unlike urllib's default), our hop
    limit, and the address guard on the connect of the URL and of every redirect."""
    return guard.opener(LimitedRedirects(max_redirects))


def _fetch(row, timeout, user_agent_token, disallowed_header_directives):
    """Drop-in for `img2dataset.downloader.download_image` (same signature and return) with caps."""
    from img2dataset.downloader import is_disallowed

    key, url = row
    max_bytes = _LIMITS["max_bytes"]
    if urlsplit(url).scheme.lower() not in ("http", "https"):
        return key, None, PERMANENT_PREFIX + "only http(s) URLs are downloaded"
    agent = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
    if user_agent_token:
        agent += f" (compatible; {user_agent_token})"
    deadline = time.monotonic() + timeout
    try:
        request = urllib.request.Request(url, headers={"User-Agent": agent})
        with _opener(_LIMITS["max_redirects"], _LIMITS["guard"]).open(request, timeout=timeout) as r:
            if disallowed_header_directives and is_disallowed(r.headers, user_agent_token, disallowed_header_directives):
                return key, None, PERMANENT_PREFIX + "Use of image disallowed by X-Robots-Tag directive"
            declared = r.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                return key, None, (PERMANENT_PREFIX +
                                   f"response of {int(declared)} bytes is above the cap of {max_bytes} bytes")
            buf = bytearray()
            while chunk := r.read(min(1 << 16, max_bytes + 1 - len(buf))):
                buf += chunk
                if len(buf) > max_bytes:
                    return key, None, PERMANENT_PREFIX + f"response is larger than the cap of {max_bytes} bytes"
                if time.monotonic() > deadline:
                    return key, None, TRANSIENT_PREFIX + f"download took longer than the {timeout:g} s timeout"
        return key, io.BytesIO(bytes(buf)), None
    except Exception as err:  # noqa: BLE001 - every failure is recorded per row, like img2dataset does
        blocked = blocked_reason(err)
        if blocked:
            return key, None, blocked  # recorded as rejected_bad_url (its own class: refused, never requested)
        return key, None, f"{classify_failure(err)}: {str(err) or type(err).__name__}"


def _fetch_with_retry(row, timeout, retries, user_agent_token, disallowed_header_directives):
    """Drop-in for `img2dataset.downloader.download_image_with_retry`: `--retries` extra attempts, but only
    after a transient failure (img2dataset's retries a 404 or a redirect loop too, for nothing)."""
    for _ in range(retries + 1):
        key, stream, err = _fetch(row, timeout, user_agent_token, disallowed_header_directives)
        if stream is not None or not (err or "").startswith(TRANSIENT_PREFIX):
            break
    return key, stream, err


_TRANSIENT_HTTP = frozenset({408, 425, 429})  # request timeout, too early, too many requests; and every 5xx
_TRANSIENT_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT,
                               errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EPIPE})


def classify_failure(err: BaseException) -> str:
    """"transient" (a retry may succeed) or "permanent" (a retry fails the same way) for a fetch error.

    Transient: HTTP 5xx, 408, 425, 429; a timeout; a reset, refused, aborted or unreachable connection; the
    server closing the connection or sending a short body (http.client's RemoteDisconnected, IncompleteRead);
    a temporary DNS failure (EAI_AGAIN). Permanent: every other HTTP status (4xx, a redirect loop, too many
    hops, a redirect to another scheme), a certificate or TLS failure, a name that does not exist, a malformed
    URL. An error none of these rules knows is transient: retrying costs one request, while calling a live URL
    dead loses a sample for good.
    """
    import http.client
    import socket
    import ssl
    import urllib.error

    if isinstance(err, urllib.error.HTTPError):
        return TRANSIENT if err.code >= 500 or err.code in _TRANSIENT_HTTP else PERMANENT
    if isinstance(err, urllib.error.URLError) and isinstance(err.reason, BaseException):
        return classify_failure(err.reason)
    if isinstance(err, urllib.error.URLError):
        return PERMANENT if "unknown url type" in str(err.reason) else TRANSIENT
    if isinstance(err, socket.gaierror):
        return TRANSIENT if err.errno in (socket.EAI_AGAIN, getattr(socket, "EAI_SYSTEM", None)) else PERMANENT
    if isinstance(err, ssl.SSLError):
        return PERMANENT if isinstance(err, ssl.SSLCertVerificationError) else TRANSIENT
    if isinstance(err, (TimeoutError, ConnectionError, http.client.IncompleteRead, http.client.RemoteDisconnected)):
        return TRANSIENT
    if isinstance(err, http.client.HTTPException):  # a malformed status line or headers
        return PERMANENT
    if isinstance(err, OSError):
        return TRANSIENT if err.errno in _TRANSIENT_ERRNOS or err.errno is None else PERMANENT
    if isinstance(err, ValueError):  # urllib: a URL it cannot parse
        return PERMANENT
    return TRANSIENT


def failure_class(status: str | None, error_message: str | None) -> str | None:
    """"transient", "permanent" or None (not a failure, or a row of a pool from before the classes)."""
    if status not in FAILED_STATUSES:
        return None
    msg = error_message or ""
    if msg.startswith(TRANSIENT_PREFIX):
        return TRANSIENT
    if msg.startswith(PERMANENT_PREFIX):
        return PERMANENT
    return None


def _classified(status: str, message: str | None) -> str | None:
    """A failed row's error_message with its class in front (resize failures: the bytes are not an image
    the decoder takes, so permanent; a row the downloader lost: transient)."""
    msg = message or "no reason given by the downloader"
    if status not in FAILED_STATUSES or msg.startswith((TRANSIENT_PREFIX, PERMANENT_PREFIX)):
        return message
    return (PERMANENT_PREFIX if status == "failed_to_resize" else TRANSIENT_PREFIX) + msg


def _blurrer():
    """img2dataset's face blurrer (boxes are relative [x1, y1, x2, y2], grown by 10% of their diagonal and
    Gaussian-feathered, as DataComp's download does)."""
    from img2dataset.blurrer import BoundingBoxBlurrer

    return BoundingBoxBlurrer()


def _safe_resizer_class():
    from img2dataset.resizer import Resizer
    from PIL import Image

    class SafeResizer(Resizer):
        """img2dataset's Resizer, but the image header is checked against a pixel cap before decoding."""

        def __init__(self, *args, max_pixels: int, **kwargs):
            super().__init__(*args, **kwargs)
            self.max_pixels = max_pixels

        def __call__(self, img_stream, blurring_bbox_list=None):
            img_stream.seek(0)
            try:
                with Image.open(img_stream) as im:  # reads the header only
                    w, h = im.size
            except Image.DecompressionBombError as e:
                return None, None, None, None, None, (
                    f"image is above the cap of {self.max_pixels} pixels (decompression bomb guard): {e}")
            except Exception:  # noqa: BLE001 - not a format PIL knows: cv2 decides (and has its own cap)
                w = h = 0
            if w * h > self.max_pixels:
                return None, None, None, None, None, (
                    f"image is {w}x{h} = {w * h} pixels, above the cap of {self.max_pixels} pixels "
                    "(decompression bomb guard)")
            img_stream.seek(0)
            return super().__call__(img_stream, blurring_bbox_list)

    return SafeResizer


@contextlib.contextmanager
def _safe_img2dataset(max_bytes: int, max_redirects: int, guard: AddressGuard) -> Iterator[None]:
    """Swap img2dataset's fetcher for `_fetch` (and its retry loop for `_fetch_with_retry`) for the duration of
    one shard (restored afterwards)."""
    import img2dataset.downloader as dl

    saved, saved_retry, saved_limits = dl.download_image, dl.download_image_with_retry, dict(_LIMITS)
    _LIMITS.update(max_bytes=max_bytes, max_redirects=max_redirects, guard=guard)
    dl.download_image, dl.download_image_with_retry = _fetch, _fetch_with_retry
    try:
        yield
    finally:
        dl.download_image, dl.download_image_with_retry = saved, saved_retry
        _LIMITS.clear()
        _LIMITS.update(saved_limits)


# --------------------------------------------------------------------------------------------------
# one shard (runs in a Ray task or a worker process)


def run_shard(job: ShardJob) -> dict:
    """Download one shard with img2dataset into staging, then write it into the pool atomically.

    Returns counts by status of the rows downloaded in this job, for progress reporting.
    """
    import pyarrow.feather as feather

    t0 = time.time()
    s = job.settings
    pool = Path(job.pool)
    staging = pool / "_staging" / f"{job.shard:08d}-{uuid.uuid4().hex[:8]}"
    out_dir = staging / "out"
    out_dir.mkdir(parents=True)
    try:
        results: dict[int, dict] = {}
        staged_tar = None
        if job.todo:
            rows = job.rows.take(pa.array(job.todo, pa.int64()))
            columns = {"uid": rows["uid"], "caption": rows["text"], "url": rows["url"]}
            blur = bool(s.get("blur_faces"))
            if blur:
                columns["face_bboxes"] = rows["face_bboxes"]
            feather.write_feather(pa.table(columns), str(staging / "input.feather"), compression="uncompressed")
            from img2dataset.downloader import Downloader
            from img2dataset.writer import WebDatasetSampleWriter

            resizer = _safe_resizer_class()(
                image_size=s["image_size"], resize_mode=s["resize_mode"],
                resize_only_if_bigger=s["resize_only_if_bigger"], encode_quality=s["encode_quality"],
                encode_format="jpg", max_pixels=s["max_pixels"], blurrer=_blurrer() if blur else None)
            downloader = Downloader(
                sample_writer_class=WebDatasetSampleWriter, resizer=resizer, thread_count=s["threads"],
                save_caption=True, extract_exif=False, output_folder=str(out_dir),
                column_list=list(columns), blurring_bbox_col="face_bboxes" if blur else None, timeout=s["timeout"],
                number_sample_per_shard=s["shard_size"], oom_shard_count=8, compute_hash="sha256",
                verify_hash_type=None, encode_format="jpg", retries=s["retries"],
                user_agent_token=USER_AGENT_TOKEN, disallowed_header_directives=DISALLOWED_HEADER_DIRECTIVES)
            guard = AddressGuard(allow_loopback=s["allow_loopback"], allow_cidrs=tuple(s["allow_cidrs"]))
            with _safe_img2dataset(s["max_bytes"], s["max_redirects"], guard):
                downloader.download_shard((job.shard, str(staging / "input.feather")))
            staged_tar = out_dir / f"{job.shard:08d}.tar"
            results = _staged_results(out_dir / f"{job.shard:08d}.parquet", job, s["shard_size"])
        counts = _write_shard(job, results, staged_tar, s["shard_size"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"shard": job.shard, "rows": len(job.todo), "counts": counts, "seconds": time.time() - t0}


def _staged_results(parquet: Path, job: ShardJob, shard_size: int) -> dict[int, dict]:
    """img2dataset's per-shard parquet -> {position in shard: result row (with 'staged_key')}.

    img2dataset keys rows by their index in the file we gave it; map that back to the input position.
    """
    base = 10 ** key_digits(shard_size) * job.shard
    out = {}
    for r in pq.read_table(parquet).to_pylist():
        idx = int(r["key"]) - base
        if not 0 <= idx < len(job.todo):
            raise RuntimeError(f"img2dataset returned key {r['key']!r} outside shard {job.shard}")
        r["staged_key"] = r["key"]
        out[job.todo[idx]] = r
    return out


def _write_shard(job: ShardJob, results: dict[int, dict], staged_tar: Path | None, shard_size: int) -> Counter:
    """Merge results into the shard's rows; write the tar (key order) then the metadata, each atomically."""
    pool = Path(job.pool)
    tar_path, meta_path = shard_paths(pool, job.shard)
    inp = job.rows.to_pylist()
    if job.merge:
        old = pq.read_table(meta_path).to_pylist()
        base = {int(r["key"][8:]): r for r in old}
    else:
        base = {}
    todo = set(job.todo)
    counts: Counter = Counter()
    meta_rows = []
    for pos, row in enumerate(inp):
        key = make_key(job.shard, pos, shard_size)
        if pos in todo:
            r = results.get(pos)
            m = {"uid": row["uid"], "url": row["url"], "text": row["text"], "shard": job.shard, "key": key,
                 "status": "failed_to_download",
                 "error_message": TRANSIENT_PREFIX + "the downloader returned no result for this row",
                 "width": None, "height": None, "original_width": None, "original_height": None, "sha256": None,
                 "_src": None}
            if r is not None:
                m.update({k: r.get(k) for k in ("status", "error_message", "width", "height", "original_width",
                                                "original_height", "sha256")})
                if m["status"] == "success":
                    m["error_message"] = None
                    m["_src"] = ("new", r["staged_key"])
                elif (m["error_message"] or "").startswith(BLOCKED_PREFIX):
                    m["status"] = REJECTED_URL  # refused before any connect, like the input's bad URLs
                else:
                    m["error_message"] = _classified(m["status"], m["error_message"])
            counts[m["status"]] += 1
        elif pos in base:
            m = dict(base[pos])
            m["_src"] = ("old", key) if m["status"] == "success" else None
        else:
            m = {"uid": row["uid"], "url": row["url"], "text": row["text"], "shard": job.shard, "key": key,
                 "status": row["status"], "error_message": row["error_message"], "width": None, "height": None,
                 "original_width": None, "original_height": None, "sha256": None, "_src": None}
            if m["status"] is None:  # cannot happen: every non-rejected row is in todo on a fresh shard
                raise RuntimeError(f"shard {job.shard} row {pos} was neither downloaded nor rejected")
        meta_rows.append(m)

    with contextlib.ExitStack() as stack:
        staged = stack.enter_context(tarfile.open(staged_tar)) if staged_tar is not None else None
        old_tar = stack.enter_context(tarfile.open(tar_path)) if job.merge and tar_path.exists() else None
        staged_idx = {m.name: m for m in staged.getmembers()} if staged else {}
        old_idx = {m.name: m for m in old_tar.getmembers()} if old_tar else {}
        with atomic_path(tar_path, suffix=".tar") as tmp:
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as out:
                for m in meta_rows:
                    src = m["_src"]
                    if src is None:
                        continue
                    which, skey = src
                    tf, idx = (staged, staged_idx) if which == "new" else (old_tar, old_idx)
                    member = idx.get(f"{skey}.jpg") if idx else None
                    if member is None:
                        m.update(status="failed_to_download",
                                 error_message=TRANSIENT_PREFIX + "image missing from the downloader output",
                                 width=None, height=None, sha256=None)
                        continue
                    image = tf.extractfile(member).read()
                    sample_json = {k: m[k] for k in ("uid", "key", "url", "text", "shard", "width", "height",
                                                     "original_width", "original_height", "sha256")}
                    for ext, data in (("jpg", image), ("txt", (m["text"] or "").encode("utf-8")),
                                      ("json", json.dumps(sample_json, sort_keys=True).encode("utf-8"))):
                        info = tarfile.TarInfo(f"{m['key']}.{ext}")
                        info.size, info.mtime, info.mode = len(data), 0, 0o644
                        out.addfile(info, io.BytesIO(data))
    for m in meta_rows:
        m.pop("_src")
    table = pa.Table.from_pylist(meta_rows, schema=METADATA_SCHEMA)
    table = table.replace_schema_metadata({TAR_BYTES_KEY: str(tar_path.stat().st_size).encode()})
    write_parquet(meta_path, table)
    return counts


# --------------------------------------------------------------------------------------------------
# distributors


RAY_TASK_RETRIES = 2  # attempts after the first when a shard's worker process or node dies


def _run_ray(cfg: DownloadConfig, jobs: list[ShardJob], on_done) -> None:
    """Shards as Ray tasks (curate.core.parallel), at most --workers (default: the cluster's CPUs) at once.

    A task whose worker process or node dies is retried by Ray (on any live node); a shard's files are written
    atomically, so a retry of a shard killed halfway starts clean (tests/reliability/test_ray_chaos.py). Finished
    shards are in place when a later one fails: a rerun resumes from them. Ray's memory monitor killing workers
    on a machine near its memory limit is the usual cause of a failure after the retries."""
    from curate.core.parallel import Backend, pmap

    backend = Backend("ray", cfg.processes or 0, cfg.ray_address or None,
                      ray_env={"NO_ALBUMENTATIONS_UPDATE": "1", "OPENCV_IO_MAX_IMAGE_PIXELS": str(cfg.max_pixels)})
    try:
        for _, res in pmap(run_shard, jobs, backend=backend, ordered=False, depth=1, retries=RAY_TASK_RETRIES,
                           label=lambda j: f"download of shard {j.shard}"):
            on_done(res)
    except CurateError:
        raise
    except Exception as e:  # the task raised (not a dead machine: that is a MachineFailure, a CurateError)
        import ray.exceptions

        if isinstance(e, ray.exceptions.RayError):
            raise CurateError(f"a shard task failed after retries ({type(e).__name__}: {str(e)[:500]}); "
                              "finished shards are kept: re-run the same command to resume") from None
        raise


def _run_multiprocessing(cfg: DownloadConfig, jobs: list[ShardJob], on_done) -> None:
    """Shards in spawned processes (one in this process when there is one); a process is replaced after 5 shards
    (img2dataset's downloader holds memory between shards)."""
    from curate.core.parallel import Backend, pmap

    procs = cfg.processes or os.cpu_count() or 1
    backend = Backend.choose(1 if len(jobs) == 1 else min(procs, len(jobs)))
    for _, res in pmap(run_shard, jobs, backend=backend, ordered=False, depth=1, max_tasks_per_child=5,
                       label=lambda j: f"download of shard {j.shard}"):
        on_done(res)


# --------------------------------------------------------------------------------------------------
# the stage


def _versions() -> dict:
    return versions("img2dataset", "ray", "webdataset", "pyarrow", "opencv-python-headless", "pillow")


def _prepare_pool(cfg: DownloadConfig, inp: InputTable) -> dict | None:
    """Check POOL against this input/settings; return the existing pool.json (or None for a new pool)."""
    out = cfg.out
    pool_json = out / "pool.json"
    ours = [out / "shards", out / "metadata", out / "_staging", pool_json]
    if cfg.overwrite:
        for p in ours:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        return None
    if not pool_json.exists():
        # empty folders are what a run that failed before its first pool.json write (a full disk) left
        if any(p.is_dir() and any(f.is_file() and not f.name.startswith(TEMP_PREFIX) for f in p.rglob("*"))
               for p in ours[:2]):
            raise CurateError(f"{out}: has shards/ or metadata/ but no pool.json, so it is not a pool this command "
                              "can resume; use --overwrite to replace them or choose another --out")
        return None
    try:
        prev = json.loads(pool_json.read_text())
    except ValueError as e:
        raise CurateError(f"{pool_json}: unreadable ({e}); use --overwrite to start again") from None
    if prev.get("format") != POOL_FORMAT:
        raise CurateError(f"{pool_json}: not a {POOL_FORMAT} pool; use --overwrite to replace it")
    if prev["input"]["sha256"] != inp.sha256:
        raise CurateError(f"{out}: was downloaded from a different input than {cfg.urls} (input hash differs); "
                          "use --overwrite to start again or choose another --out")
    if prev["content_settings"] != cfg.content():
        diff = {k: (prev["content_settings"].get(k), v) for k, v in cfg.content().items()
                if prev["content_settings"].get(k) != v}
        raise CurateError(f"{out}: was downloaded with other settings {diff} (was, now); "
                          "use the same options, or --overwrite to start again")
    return prev


def download(cfg: DownloadConfig) -> dict:
    """Download `cfg.urls` into the pool `cfg.out`; resumable, idempotent; returns the pool summary.

    Raises CurateError if the final reconciliation (curate.pool.verify) fails.
    """
    from curate.pool.shard_table import metadata_successes, shard_file_name, write_shard_table
    from curate.pool.verify import uid_digest, verify_pool

    started = time.time()
    say = click.echo if cfg.echo else (lambda *a, **k: None)
    inp = read_input(cfg.urls, InputColumns(cfg.url_col, cfg.text_col, cfg.uid_col, cfg.bbox_col))
    if cfg.blur_faces and not inp.has_bboxes:
        raise CurateError(f"{cfg.urls}: --blur-faces needs a {cfg.bbox_col!r} column of face boxes (DataComp's "
                          "metadata has one); use --bbox-col to name it, or --no-blur-faces")
    prev = _prepare_pool(cfg, inp)
    n = inp.num_rows
    n_shards = math.ceil(n / cfg.shard_size)
    out = cfg.out
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    if (out / "_staging").exists():
        shutil.rmtree(out / "_staging", ignore_errors=True)  # left by a killed run
    cleanup_temp_files(out / "shards")
    cleanup_temp_files(out / "metadata")

    settings = asdict(cfg)
    settings.update(urls=str(cfg.urls), out=str(cfg.out))
    job_settings = {k: settings[k] for k in ("shard_size", "image_size", "resize_mode", "resize_only_if_bigger",
                                             "encode_quality", "threads", "timeout", "retries", "max_bytes",
                                             "max_pixels", "max_redirects", "allow_loopback", "allow_cidrs")}
    job_settings["blur_faces"] = inp.has_bboxes if cfg.blur_faces is None else cfg.blur_faces

    def shard_rows(k: int) -> pa.Table:
        return inp.table.slice(k * cfg.shard_size, cfg.shard_size)

    jobs: list[ShardJob] = []
    done_shards = 0
    # Samples per finished shard, for the shard table (shards/sizes.json) that DataComp's resharder and
    # open_clip_train read. Always rebuilt from the metadata of the shards on disk, never carried over from
    # an older table, so a killed run, a resumed one and a pool from before the table existed all end right.
    sizes: dict[int, int] = {}

    def write_sizes() -> bool:
        return write_shard_table(out / "shards", {shard_file_name(k): c for k, c in sorted(sizes.items())})

    for k in range(n_shards):
        if shard_is_done(out, k):
            done_shards += 1
            sizes[k] = metadata_successes(shard_paths(out, k)[1])
            if cfg.retry_failed:
                meta = pq.read_table(shard_paths(out, k)[1], columns=["key", "status", "error_message"])
                statuses = meta["status"].to_pylist()
                # only transient failures (and unclassified ones of older pools) are requested again, unless
                # --retry-permanent; rows the address guard blocked are re-checked too: the policy
                # (--allow-cidr) and DNS may differ now
                todo = [int(key[8:]) for key, st, err in zip(meta["key"].to_pylist(), statuses,
                                                             meta["error_message"].to_pylist())
                        if (st in FAILED_STATUSES and (cfg.retry_permanent or failure_class(st, err) != PERMANENT))
                        or (st == REJECTED_URL and (err or "").startswith(BLOCKED_PREFIX))]
                if todo:
                    jobs.append(ShardJob(k, str(out), shard_rows(k), todo, True, job_settings))
            continue
        rows = shard_rows(k)
        todo = [i for i, st in enumerate(rows["status"].to_pylist()) if st is None]
        jobs.append(ShardJob(k, str(out), rows, todo, False, job_settings))

    if not jobs and prev is not None and prev.get("state") == "complete":
        wrote = write_sizes()  # a pool from before the table existed gets it here; an up-to-date one is untouched
        say(f"{out}: already up to date ({n} rows in {n_shards} shards)"
            + ("; no failed rows to retry" if cfg.retry_failed else "")
            + ("; wrote shards/sizes.json" if wrote else ""))
        return StageSummary("download", True, time.time() - started, fields=prev).as_dict()

    state = {
        "format": POOL_FORMAT,
        "state": "in_progress",
        "input": {"path": str(cfg.urls.resolve()), "files": [f.name for f in inp.files], "sha256": inp.sha256,
                  "rows": n, "uids_given": inp.uids_given, "uid_multiset_sha256": uid_digest(inp.table["uid"].to_pylist())},
        "content_settings": cfg.content(),
        "shards": n_shards,
        "key_digits": key_digits(cfg.shard_size),
        "runs": (prev or {}).get("runs", []),
    }
    write_json(out / "pool.json", state)
    write_sizes()  # drops entries of shards about to be redone

    rows_todo = sum(len(j.todo) for j in jobs)
    run_counts: Counter = Counter()
    show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    from tqdm import tqdm

    bar = tqdm(total=rows_todo, unit="sample", desc="download", disable=not show, smoothing=0.1, dynamic_ncols=True)

    def on_done(res: dict) -> None:
        # the shard's files are in place: its whole count (old successes too, under --retry-failed) goes in
        sizes[res["shard"]] = metadata_successes(shard_paths(out, res["shard"])[1])
        write_sizes()
        run_counts.update(res["counts"])
        done = sum(run_counts.values())
        bar.update(res["rows"])
        bar.set_postfix(success=f"{run_counts['success'] / done:.1%}" if done else "-", shards=f"{res['shard']}")

    t_dl = time.time()
    if jobs:
        say(f"{out}: {len(jobs)} shard(s) to {'retry' if cfg.retry_failed and done_shards == n_shards else 'download'}, "
            f"{rows_todo} rows ({done_shards}/{n_shards} shards already done); distributor={cfg.distributor}", err=True)
        if cfg.distributor == "ray":
            _run_ray(cfg, jobs, on_done)
        else:
            _run_multiprocessing(cfg, jobs, on_done)
    bar.close()
    # Every task has ended here, so nothing writes to _staging any more: remove what a killed attempt (a Ray
    # worker or node that died mid-shard, its task since retried) left, not only at the next run's start.
    shutil.rmtree(out / "_staging", ignore_errors=True)
    dl_seconds = time.time() - t_dl

    report = verify_pool(out, expected_uids=inp.table["uid"].to_pylist(), pool_meta=state)
    state["counts"] = dict(sorted(report.status_counts.items()))
    # the share of the input that downloaded travels with every result made from this pool (curate.pool.completeness)
    rows_in = int((state.get("input") or {}).get("rows") or 0)
    state["success_share"] = round(state["counts"].get("success", 0) / rows_in, 6) if rows_in else None
    state["state"] = "complete" if report.ok else "failed_verification"
    state["versions"] = _versions()
    state["address_guard"] = {"allow_loopback": cfg.allow_loopback, "allow_cidrs": list(cfg.allow_cidrs),
                              "blocked_rows": count_blocked(out, n_shards)}
    run = {"started": started, "finished": time.time(), "seconds": round(time.time() - started, 3),
           "download_seconds": round(dl_seconds, 3), "rows_attempted": rows_todo,
           "samples_per_s": round(rows_todo / dl_seconds, 2) if dl_seconds > 0 and rows_todo else None,
           "shards_run": len(jobs), "retry_failed": cfg.retry_failed, "counts": dict(run_counts),
           "run_settings": {k: settings[k] for k in ("processes", "threads", "timeout", "retries", "max_bytes",
                                                    "max_pixels", "max_redirects", "allow_loopback", "allow_cidrs",
                                                    "distributor", "ray_address")}}
    state["runs"] = state["runs"] + [run]
    state["timings"] = {"last_run_seconds": run["seconds"], "last_download_seconds": run["download_seconds"],
                        "last_samples_per_s": run["samples_per_s"]}
    write_json(out / "pool.json", state)
    say(summary_table(state, run, failure_classes(out, n_shards)))
    if not report.ok:
        say(report.table(), err=True)
        raise CurateError(f"{out}: reconciliation failed after download (see table above); "
                          "re-run the same command to repair, or `curate pool verify` for details")
    return StageSummary("download", False, run["seconds"], fields=state).as_dict()


def count_blocked(pool: Path, n_shards: int) -> int:
    """Rows of the pool's metadata that the address guard refused (rejected_bad_url with the guard's reason)."""
    import pyarrow.compute as pc

    n = 0
    for k in range(n_shards):
        meta = shard_paths(pool, k)[1]
        if meta.exists():
            t = pq.read_table(meta, columns=["status", "error_message"])
            hit = pc.and_(pc.equal(t["status"], REJECTED_URL),
                          pc.starts_with(pc.fill_null(t["error_message"], ""), BLOCKED_PREFIX))
            n += int(pc.sum(hit).as_py() or 0)
    return n


def failure_classes(pool: Path, n_shards: int) -> Counter:
    """Failed rows of the pool's metadata by class: "transient", "permanent" and None (unclassified: a pool
    from before the classes existed)."""
    out: Counter = Counter()
    for k in range(n_shards):
        meta = shard_paths(pool, k)[1]
        if meta.exists():
            t = pq.read_table(meta, columns=["status", "error_message"])
            out.update(failure_class(st, err) for st, err in zip(t["status"].to_pylist(), t["error_message"].to_pylist())
                       if st in FAILED_STATUSES)
    return out


def summary_table(state: dict, run: dict, classes: Counter | None = None) -> str:
    counts = state.get("counts", {})
    total = sum(counts.values()) or 1
    lines = [f"{'status':<24} {'rows':>10} {'share':>7}"]
    for st, c in sorted(counts.items(), key=lambda kv: -kv[1]):
        lines.append(f"{st:<24} {c:>10} {c / total:>7.1%}")
    lines.append(f"{'total':<24} {sum(counts.values()):>10}")
    blocked = (state.get("address_guard") or {}).get("blocked_rows")
    if blocked:
        lines.append(f"{blocked} of the {REJECTED_URL} rows were refused by the address guard (not globally "
                     "routable; see their error_message, and --allow-loopback / --allow-cidr)")
    if classes:
        lines.append(f"failed rows: {classes[TRANSIENT]} transient (5xx, 429, resets, timeouts: --retry-failed requests "
                     f"them again), {classes[PERMANENT]} permanent (404/410, redirect loops, not an image: not retried "
                     "unless --retry-permanent)" + (f", {classes[None]} unclassified" if classes[None] else ""))
    rate = f", {run['samples_per_s']} samples/s" if run.get("samples_per_s") else ""
    lines.append(f"{state['shards']} shards; this run: {run['rows_attempted']} rows in "
                 f"{run['download_seconds']:.1f} s{rate}; pool state: {state['state']}")
    return "\n".join(lines)


@click.command("download")
@click.option("--urls", "urls", required=True, type=click.Path(exists=True, path_type=Path),
              help="URL table: .parquet, .csv, .tsv or .jsonl (or a folder of them) with URL and caption columns. "
                   "A `uid` column, if present, is kept unchanged instead of derived.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Pool folder to write.")
@click.option("--url-col", default="url", show_default=True, help="Input column holding the image URL.")
@click.option("--text-col", default="text", show_default=True, help="Input column holding the caption.")
@click.option("--uid-col", default="uid", show_default=True, help="Input column with given uids (used if present).")
@click.option("--blur-faces/--no-blur-faces", default=None,
              help="Blur the face boxes of --bbox-col in every image at download time, as DataComp does "
                   "[default: on when the input has that column].")
@click.option("--bbox-col", default="face_bboxes", show_default=True,
              help="Input column of face boxes, relative [x1, y1, x2, y2] per box (DataComp's face_bboxes).")
@click.option("--shard-size", default=10_000, show_default=True, type=int, help="Input rows per shard.")
@click.option("--workers", "--processes", "processes", default=None, type=int,
              help="Shards downloaded at once: processes, or Ray tasks in flight. Default: one per CPU of the Ray "
                   "cluster (or of this machine). --processes is the older name of this option.")
@click.option("--threads", default=64, show_default=True, type=int, help="Download threads per shard.")
@click.option("--image-size", default=256, show_default=True, type=int, help="Output image size (pixels).")
@click.option("--resize-mode", default="border", show_default=True,
              type=click.Choice(["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"]),
              help="img2dataset resize mode.")
@click.option("--resize-only-if-bigger", is_flag=True, help="Never upscale small images.")
@click.option("--encode-quality", default=95, show_default=True, type=int, help="JPEG quality of stored images.")
@click.option("--timeout", default=10.0, show_default=True, type=float,
              help="Seconds allowed for one whole request (connect, headers and body).")
@click.option("--retries", default=0, show_default=True, type=int, help="Extra attempts per failed URL.")
@click.option("--max-bytes", default=16 << 20, show_default=True, type=int, help="Largest response body accepted.")
@click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True, type=int,
              help="Largest image (width x height) decoded; bigger ones are recorded as failed_to_resize.")
@click.option("--max-redirects", default=5, show_default=True, type=int, help="Redirect hops followed per URL.")
@click.option("--allow-loopback", is_flag=True,
              help="Let the address guard allow 127.0.0.0/8 and ::1 (a local test server, the offline demo). "
                   "Without it every address that is not globally routable is refused.")
@click.option("--allow-cidr", "allow_cidrs", multiple=True, metavar="CIDR",
              help="Let the address guard allow this network too (e.g. 10.20.0.0/16 for an internal mirror). "
                   "Repeatable; a bad CIDR is an error.")
@click.option("--distributor", default="ray", show_default=True, type=click.Choice(["ray", "multiprocessing"]),
              help="Run shards as Ray tasks (local Ray, or the cluster at --ray-address) or in local processes.")
@click.option("--ray-address", default=None, help="Join this Ray cluster (e.g. 10.0.0.1:6379 or 'auto').")
@click.option("--retry-failed", is_flag=True,
              help="Re-attempt the transient failures of finished shards (error_message 'transient: ...': 5xx, "
                   "429, resets, timeouts; and the rows the address guard blocked) and rewrite those shards "
                   "atomically. Permanent failures (404, redirect loops, not an image) are not requested again.")
@click.option("--retry-permanent", is_flag=True,
              help="With --retry-failed: re-attempt the permanent failures too (a site that was fixed).")
@click.option("--overwrite", is_flag=True, help="Delete this pool's shards, metadata and pool.json and start again.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when on a terminal).")
def download_cmd(**kw) -> None:
    """Download images for a URL table into a webdataset pool, every input row accounted for.

    Writes OUT/shards/{shard:08d}.tar, OUT/metadata/{shard:08d}.parquet (one row per input row: success,
    failure or rejection, with its reason) and OUT/pool.json. Re-running the same command resumes a killed
    run and does nothing once the pool is complete. Ends by reconciling metadata, tars and input
    (as `curate pool verify` does) and exits non-zero if they disagree.

    Address guard: each URL's host, and each redirect's, is resolved once and the connection goes only to
    an address that was checked; loopback, private, link-local (cloud metadata 169.254.169.254), CGNAT
    100.64.0.0/10, 0.0.0.0/8, multicast, reserved and documentation addresses (also in IPv4-mapped, 6to4
    and NAT64 form) are refused. The row is recorded as rejected_bad_url with the reason, and pool.json
    counts them (address_guard.blocked_rows). --allow-loopback and --allow-cidr widen the policy.
    Proxies from http_proxy/https_proxy/no_proxy are used; the guard applies to the target host, which is
    checked before the proxy is contacted (the proxy resolves it again itself, so pinning to the checked
    address holds for direct connections only).
    """
    download(DownloadConfig(**kw))
