"""A loopback HTTP server that stands in for the web: serves a pool's `DIR/www/` read-only.

Downloads in tests and in the offline demo are real HTTP traffic (img2dataset talks to this server
exactly as it would to a web host), so the downloader's 404 / redirect / timeout / bad-bytes paths
are exercised for real.

Built on the standard library's `ThreadingHTTPServer`: a loopback static-file server needs no extra
dependency, and `http.server.SimpleHTTPRequestHandler` is not used because it lists directories
and follows symlinks out of its root; this handler does neither.

Routes (all GET/HEAD, read-only):
  /<path>                      the file DIR/www/<path> (404 if missing, a directory, or outside www)
  /_slow/<seconds>/<path>      sleeps <seconds> (capped at MAX_SLOW_SECONDS), then serves <path>
  /_redirect/<n>/<path>        n hops of 302 (capped at MAX_REDIRECTS), then serves <path>
  /_fault/<kind>/<seed>/<n>/<path>
                               a flaky web (docs/RELIABILITY.md, "A flaky web"): fault <kind> of FAULTS
                               on the first <n> requests of this exact target (path and query) for
                               transient kinds, on every request for permanent ones; then <path>.
                               <seed> picks the variant (which 5xx code, reset before or mid-body).

FAULTS is the one place that says what each fault is and what `curate download` must make of it
(status after the first run, transient or permanent, status after `--retry-failed`); the flaky-web
test and perf/bench_flaky_web.py assert against it row by row. Every request is appended to the
server's request log (`PoolServer.requests`; `curate pool serve --request-log FILE` writes it as JSON
lines when the server stops), which is how a test proves that a permanent fault is never re-requested.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mimetypes
import os
import random
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlsplit

import click

from curate.core.errors import CurateError

log = logging.getLogger(__name__)

DEFAULT_PORT = 8642
DEFAULT_HOST = "127.0.0.1"
MAX_SLOW_SECONDS = 120.0
MAX_REDIRECTS = 50
MAX_FAULT_REPEATS = 1000
DEFAULT_STALL_SECONDS = 30.0  # longer than any sensible client timeout
DEFAULT_TRICKLE_SECONDS = 15.0
_CHUNK = 1 << 16

TRANSIENT = "transient"
PERMANENT = "permanent"


@dataclass(frozen=True)
class Fault:
    """One fault mode of `/_fault/<kind>/...` and the outcome `curate download` must give it.

    `failure` is how the downloader classifies the failed row (None: the row is not a failure);
    `first` is the row's status after the first run, `final` after as many `--retry-failed` runs as
    the burst is long (n). A permanent row is never requested again by `--retry-failed`.
    """

    kind: str
    server: str  # what the server does
    first: str
    failure: str | None
    final: str

    @property
    def transient(self) -> bool:
        return self.failure == TRANSIENT


FAULTS: dict[str, Fault] = {f.kind: f for f in (
    Fault("none", "serves the file (control)", "success", None, "success"),
    Fault("burst_5xx", "answers 500/502/503/504 (the seed picks) to the first n requests, then the file",
          "failed_to_download", TRANSIENT, "success"),
    Fault("rate_limit_429", "answers 429 Too Many Requests (Retry-After: 1) to the first n requests, then the file",
          "failed_to_download", TRANSIENT, "success"),
    Fault("reset", "resets the TCP connection (RST) of the first n requests, before the headers or "
          "half-way through the body (the seed picks), then the file",
          "failed_to_download", TRANSIENT, "success"),
    Fault("stall", "sends nothing for --stall-seconds (past the client's timeout) on the first n requests, "
          "then the file", "failed_to_download", TRANSIENT, "success"),
    Fault("trickle", "sends the body in 8 pieces spread over --trickle-seconds (past the client's whole-request "
          "timeout) on the first n requests, then the file", "failed_to_download", TRANSIENT, "success"),
    Fault("wrong_type", "serves the valid image with Content-Type: text/html, always",
          "success", None, "success"),
    Fault("redirect_loop", "answers every request with a 302 to itself", "failed_to_download", PERMANENT,
          "failed_to_download"),
    Fault("not_found", "answers 404, always", "failed_to_download", PERMANENT, "failed_to_download"),
    Fault("gone", "answers 410 Gone, always", "failed_to_download", PERMANENT, "failed_to_download"),
    Fault("not_image", "answers 200 text/html with an HTML page instead of the image, always",
          "failed_to_resize", PERMANENT, "failed_to_resize"),
)}
_5XX = (HTTPStatus.INTERNAL_SERVER_ERROR, HTTPStatus.BAD_GATEWAY, HTTPStatus.SERVICE_UNAVAILABLE,
        HTTPStatus.GATEWAY_TIMEOUT)
_HTML = b"<!doctype html><html><head><title>Photo</title></head><body><p>not an image</p></body></html>\n"


def fault_path(kind: str, seed: int, n: int, path: str) -> str:
    """The URL path that serves `path` behind fault `kind` (`path` without its leading slash)."""
    if kind not in FAULTS:
        raise CurateError(f"unknown fault {kind!r}; one of {', '.join(FAULTS)}")
    return f"/_fault/{kind}/{int(seed)}/{int(n)}/{path.lstrip('/')}"


def fault_plan(seed: int, rows: int, kinds: tuple[str, ...] | None = None, max_n: int = 2) -> list[tuple[str, int, int]]:
    """A seeded assignment of (kind, seed, n) to `rows` URLs: every kind in turn (so each appears), in a
    seeded order, each with its own seed and a burst length n in 1..max_n. Same seed, same plan."""
    kinds = tuple(kinds or FAULTS)
    rng = random.Random(seed)
    plan = [(kinds[i % len(kinds)], rng.randrange(1 << 30), rng.randint(1, max_n)) for i in range(rows)]
    rng.shuffle(plan)
    return plan


def _safe_parts(url_path: str) -> list[str] | None:
    """Split a URL path into safe components, or None if it tries to leave the root.

    Rejects `..`, `.`, empty components (``//``), backslashes and NUL bytes instead of normalising
    them, so there is exactly one spelling of every served file.
    """
    path = unquote(url_path)
    if not path.startswith("/") or "\x00" in path or "\\" in path:
        return None
    parts = path[1:].split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    return parts


class _Handler(BaseHTTPRequestHandler):
    server_version = "curate-serve"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    # set on the subclass made per server
    pool_dir: Path = Path(".")
    stall_seconds: float = DEFAULT_STALL_SECONDS
    trickle_seconds: float = DEFAULT_TRICKLE_SECONDS

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._respond(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802 - stdlib name
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        parts = _safe_parts(urlsplit(self.path).path)
        if parts is not None and parts[0] == "_fault" and len(parts) >= 5:
            return self._fault(parts, send_body)
        self.server.log_request_line(self.command, self.path, None)
        if parts is None:
            return self._error(HTTPStatus.NOT_FOUND)
        if parts[0] == "_slow" and len(parts) >= 3:
            try:
                seconds = float(parts[1])
            except ValueError:
                return self._error(HTTPStatus.NOT_FOUND)
            if not (seconds >= 0):  # also rejects nan
                return self._error(HTTPStatus.NOT_FOUND)
            time.sleep(min(seconds, MAX_SLOW_SECONDS))
            return self._serve_file(parts[2:], send_body)
        if parts[0] == "_redirect" and len(parts) >= 3:
            try:
                hops = int(parts[1])
            except ValueError:
                return self._error(HTTPStatus.NOT_FOUND)
            if hops < 0 or hops > MAX_REDIRECTS:
                return self._error(HTTPStatus.NOT_FOUND)
            rest = "/".join(parts[2:])
            if hops == 0:
                return self._serve_file(parts[2:], send_body)
            target = f"/_redirect/{hops - 1}/{rest}" if hops > 1 else f"/{rest}"
            self.send_response(HTTPStatus.FOUND)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return self._serve_file(parts, send_body)

    def _fault(self, parts: list[str], send_body: bool) -> None:
        """`/_fault/<kind>/<seed>/<n>/<path>`: see FAULTS. The request is counted per exact target."""
        kind, rest = parts[1], parts[4:]
        fault = FAULTS.get(kind)
        seen = self.server.log_request_line(self.command, self.path, kind if fault else None)
        try:
            seed, n = int(parts[2]), int(parts[3])
        except ValueError:
            return self._error(HTTPStatus.NOT_FOUND)
        if fault is None or not 0 <= n <= MAX_FAULT_REPEATS:
            return self._error(HTTPStatus.NOT_FOUND)
        active = fault.failure == PERMANENT or fault.kind == "wrong_type" or seen <= n
        if kind == "none" or not active:
            return self._serve_file(rest, send_body)
        variant = random.Random(f"{seed}/{'/'.join(rest)}").randrange(1 << 16)
        if kind == "burst_5xx":
            return self._error(_5XX[variant % len(_5XX)])
        if kind == "rate_limit_429":
            return self._error(HTTPStatus.TOO_MANY_REQUESTS, {"Retry-After": "1"})
        if kind == "not_found":
            return self._error(HTTPStatus.NOT_FOUND)
        if kind == "gone":
            return self._error(HTTPStatus.GONE)
        if kind == "redirect_loop":
            self.send_response(HTTPStatus.FOUND)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if kind == "not_image":
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(_HTML)))
            self.end_headers()
            if send_body:
                self.wfile.write(_HTML)
            return None
        if kind == "wrong_type":
            return self._serve_file(rest, send_body, content_type="text/html; charset=utf-8")
        if kind == "stall":
            time.sleep(min(self.stall_seconds, MAX_SLOW_SECONDS))
            self.close_connection = True
            return None  # the client gave up long ago: say nothing, close
        if kind == "reset":
            if variant % 2 == 0:
                return self._reset()
            return self._serve_file(rest, send_body, reset_after=0.5)
        if kind == "trickle":
            return self._serve_file(rest, send_body, trickle=min(self.trickle_seconds, MAX_SLOW_SECONDS))
        raise AssertionError(kind)  # every kind of FAULTS is handled above

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0, then close), as a crashed or overloaded host does."""
        self.close_connection = True
        try:
            self.wfile.flush()
        except OSError:
            pass
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        os.close(self.connection.detach())  # the real close now (file objects of the socket keep it open)

    def _resolve(self, parts: list[str]) -> Path | None:
        """The real path of a file inside www, or None (missing, not a file, or escapes via symlink)."""
        root = (self.pool_dir / "www").resolve()
        try:
            target = root.joinpath(*parts).resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if target == root or root not in target.parents or not target.is_file():
            return None
        return target

    def _serve_file(self, parts: list[str], send_body: bool, content_type: str | None = None,
                    trickle: float = 0.0, reset_after: float | None = None) -> None:
        """Serve a file of www. Fault options: another Content-Type; the body in 8 pieces spread over
        `trickle` seconds; a reset after `reset_after` of the body (a share) was sent."""
        target = self._resolve(parts)
        if target is None:
            return self._error(HTTPStatus.NOT_FOUND)
        try:
            fh = open(target, "rb")
        except OSError:
            return self._error(HTTPStatus.NOT_FOUND)
        with fh:
            size = os.fstat(fh.fileno()).st_size
            ctype = content_type or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            if not send_body:
                return None
            try:
                if reset_after is not None:
                    self.wfile.write(fh.read(int(size * reset_after)))
                    return self._reset()
                if trickle > 0:
                    data = fh.read()
                    piece = max(1, -(-len(data) // 8))
                    for i in range(0, len(data), piece):
                        time.sleep(trickle / 8)
                        self.wfile.write(data[i:i + piece])
                        self.wfile.flush()
                    return None
                while chunk := fh.read(_CHUNK):
                    self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                log.debug("client went away while sending %s", target)
        return None

    def _error(self, status: HTTPStatus, headers: dict[str, str] | None = None) -> None:
        body = f"{status.value} {status.phrase}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return None


class PoolServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # a downloader opens dozens of connections at once

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.requests: list[dict] = []  # the request log: {"method", "path", "fault", "t"}
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()

    def log_request_line(self, method: str, path: str, fault: str | None) -> int:
        """Record a request; return how many times this exact target was requested (this one included)."""
        with self._lock:
            self.requests.append({"method": method, "path": path, "fault": fault, "t": round(time.time(), 3)})
            n = self._seen[path] = self._seen.get(path, 0) + 1
        return n

    def write_request_log(self, path: str | os.PathLike) -> None:
        from curate.core.atomic import write_text

        with self._lock:
            lines = [json.dumps(r, sort_keys=True) + "\n" for r in self.requests]
        write_text(path, "".join(lines))


def make_server(directory: str | os.PathLike, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                stall_seconds: float = DEFAULT_STALL_SECONDS,
                trickle_seconds: float = DEFAULT_TRICKLE_SECONDS) -> PoolServer:
    """Bind a server for `directory` (its `www/` subfolder is served; it may be created later)."""
    if not (stall_seconds >= 0 and trickle_seconds >= 0):
        raise CurateError("--stall-seconds and --trickle-seconds must be >= 0")
    handler = type("PoolHandler", (_Handler,), {"pool_dir": Path(directory).absolute(),
                                                "stall_seconds": float(stall_seconds),
                                                "trickle_seconds": float(trickle_seconds)})
    try:
        return PoolServer((host, port), handler)
    except OSError as e:
        raise CurateError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def base_url_of(server: PoolServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


def pool_port(directory: str | os.PathLike) -> int:
    """The port of the base URL recorded in DIR/pool_build.json, else DEFAULT_PORT."""
    meta = Path(directory) / "pool_build.json"
    try:
        url = json.loads(meta.read_text())["base_url"]
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_PORT
    port = urlsplit(url).port if isinstance(url, str) else None
    return port or DEFAULT_PORT


def serve(directory: str | os.PathLike, host: str = DEFAULT_HOST, port: int | None = None,
          stall_seconds: float = DEFAULT_STALL_SECONDS, trickle_seconds: float = DEFAULT_TRICKLE_SECONDS,
          request_log: str | os.PathLike | None = None) -> None:
    """Serve `directory/www` until Ctrl-C or SIGTERM (blocking). Port None = the pool's recorded port.
    `request_log`: write every request as a JSON line to this file when the server stops."""
    directory = Path(directory)
    if not (directory / "www").is_dir():
        raise CurateError(f"{directory}: has no www/ folder; build a pool first with `curate pool build-offline --out {directory}`")
    server = make_server(directory, host, pool_port(directory) if port is None else port,
                         stall_seconds=stall_seconds, trickle_seconds=trickle_seconds)

    def _on_sigterm(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() else None
    click.echo(f"serving {directory / 'www'} at {base_url_of(server)}/ (Ctrl-C to stop)", err=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        click.echo("stopped", err=True)
    finally:
        server.server_close()
        if request_log is not None:
            server.write_request_log(request_log)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def running_server(directory: str | os.PathLike, port: int = 0, host: str = DEFAULT_HOST,
                   stall_seconds: float = DEFAULT_STALL_SECONDS, trickle_seconds: float = DEFAULT_TRICKLE_SECONDS,
                   request_log: list | None = None) -> Iterator[str]:
    """Run the server in a background thread; yield its base URL (port 0 = a free port).
    `request_log`: a list that becomes the server's request log (read it while or after it runs)."""
    server = make_server(directory, host, port, stall_seconds=stall_seconds, trickle_seconds=trickle_seconds)
    if request_log is not None:
        server.requests = request_log
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True,
                              name=f"curate-serve-{server.server_address[1]}")
    thread.start()
    try:
        yield base_url_of(server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@click.command("serve")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Port to listen on. Default: the port of the base URL the pool was built with "
                   f"(DIR/pool_build.json), else {DEFAULT_PORT}.")
@click.option("--host", default=DEFAULT_HOST, show_default=True,
              help="Address to bind. Keep the loopback default unless you mean to expose the pool.")
@click.option("--stall-seconds", type=click.FloatRange(min=0), default=DEFAULT_STALL_SECONDS, show_default=True,
              help="How long a /_fault/stall/ request waits before the connection is closed.")
@click.option("--trickle-seconds", type=click.FloatRange(min=0), default=DEFAULT_TRICKLE_SECONDS, show_default=True,
              help="How long a /_fault/trickle/ body takes to send.")
@click.option("--request-log", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write every request (method, path, fault, time) as JSON lines to this file when stopped.")
def serve_cmd(directory: Path, port: int | None, host: str, stall_seconds: float, trickle_seconds: float,
              request_log: Path | None) -> None:
    """Serve a pool's DIR/www/ over HTTP so downloads are real web traffic.

    Read-only, no directory listings, nothing outside www/ (no `..`, no symlinks out). Test routes:
    /_slow/<seconds>/<path> answers after a delay, /_redirect/<n>/<path> answers after n 302 hops,
    /_fault/<kind>/<seed>/<n>/<path> is a flaky web (burst_5xx, rate_limit_429, reset, stall, trickle on
    the first n requests of a URL; wrong_type, redirect_loop, not_found, gone, not_image always; see
    docs/RELIABILITY.md, "A flaky web").
    Stops cleanly on Ctrl-C or SIGTERM.
    """
    serve(directory, host=host, port=port, stall_seconds=stall_seconds, trickle_seconds=trickle_seconds,
          request_log=request_log)
