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
"""

from __future__ import annotations

import contextlib
import json
import logging
import mimetypes
import os
import signal
import threading
import time
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
_CHUNK = 1 << 16


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

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._respond(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802 - stdlib name
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        parts = _safe_parts(urlsplit(self.path).path)
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

    def _serve_file(self, parts: list[str], send_body: bool) -> None:
        target = self._resolve(parts)
        if target is None:
            return self._error(HTTPStatus.NOT_FOUND)
        try:
            fh = open(target, "rb")
        except OSError:
            return self._error(HTTPStatus.NOT_FOUND)
        with fh:
            size = os.fstat(fh.fileno()).st_size
            ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            if send_body:
                try:
                    while chunk := fh.read(_CHUNK):
                        self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    log.debug("client went away while sending %s", target)
        return None

    def _error(self, status: HTTPStatus) -> None:
        body = f"{status.value} {status.phrase}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return None


class PoolServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def make_server(directory: str | os.PathLike, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> PoolServer:
    """Bind a server for `directory` (its `www/` subfolder is served; it may be created later)."""
    handler = type("PoolHandler", (_Handler,), {"pool_dir": Path(directory).absolute()})
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


def serve(directory: str | os.PathLike, host: str = DEFAULT_HOST, port: int | None = None) -> None:
    """Serve `directory/www` until Ctrl-C or SIGTERM (blocking). Port None = the pool's recorded port."""
    directory = Path(directory)
    if not (directory / "www").is_dir():
        raise CurateError(f"{directory}: has no www/ folder; build a pool first with `curate pool build-offline --out {directory}`")
    server = make_server(directory, host, pool_port(directory) if port is None else port)

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
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def running_server(directory: str | os.PathLike, port: int = 0, host: str = DEFAULT_HOST) -> Iterator[str]:
    """Run the server in a background thread; yield its base URL (port 0 = a free port)."""
    server = make_server(directory, host, port)
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
def serve_cmd(directory: Path, port: int | None, host: str) -> None:
    """Serve a pool's DIR/www/ over HTTP so downloads are real web traffic.

    Read-only, no directory listings, nothing outside www/ (no `..`, no symlinks out). Test routes:
    /_slow/<seconds>/<path> answers after a delay, /_redirect/<n>/<path> answers after n 302 hops.
    Stops cleanly on Ctrl-C or SIGTERM.
    """
    serve(directory, host=host, port=port)
