"""The address guard (curate.core.address_guard) on every fetch: no request reaches an address that is not
globally routable, initially, after a redirect, or after a DNS change.

Test safety: no test here emits a packet beyond loopback. The `net` fixture replaces the resolver
(`socket.getaddrinfo`) with a table, so no DNS query leaves the machine, and makes `socket.socket.connect`,
`connect_ex` and `socket.create_connection` raise for any non-loopback target (and records every attempt, so
a test can assert there were none). `curate download` runs in-process (multiprocessing distributor, one
process), so the stubs apply to img2dataset's download threads too. Servers are tiny counting HTTP servers
bound on 127.0.0.1 and 127.0.0.2 (both loopback on Linux); one that must see nothing is asserted to have
counted zero requests.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import socket
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from curate.cli import main
from curate.core.address_guard import BLOCKED_PREFIX, AddressGuard, BlockedAddressError, blocked_reason
from curate.core.errors import CurateError
from curate.pool.download import DownloadConfig

PNG_BUF = io.BytesIO()
Image.fromarray((np.random.RandomState(0).rand(24, 32, 3) * 255).astype("uint8")).save(PNG_BUF, "PNG")
PNG = PNG_BUF.getvalue()


# ------------------------------------------------------------------------------------------------
# test safety: a stub resolver and a connect that only reaches loopback


def _is_loopback(host) -> bool:
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class Net:
    """The stub network: `names` maps a host name to its answers (a list of addresses, or a list of such lists
    for successive lookups: a DNS change); `connects` records every connect attempt's (host, port)."""

    def __init__(self):
        self.names: dict[str, list] = {}
        self.lookups: list[str] = []
        self.connects: list[tuple[str, int]] = []
        self.escaped: list[tuple[str, int]] = []  # non-loopback attempts (refused by the stub)

    def answer(self, host: str, *successive: list[str]) -> None:
        self.names[host.lower()] = list(successive)

    def connects_to(self, port: int) -> list[tuple[str, int]]:
        return [c for c in self.connects if c[1] == port]


@pytest.fixture
def net(monkeypatch):
    n = Net()
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_create_connection = socket.create_connection

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):  # noqa: A002 - socket's signature
        host = host.decode() if isinstance(host, bytes) else str(host)
        n.lookups.append(host)
        try:
            addrs = [str(ipaddress.ip_address(host.strip("[]")))]  # a literal: no lookup, like the real one
        except ValueError:
            answers = n.names.get(host.lower())
            if not answers:
                raise socket.gaierror(socket.EAI_NONAME, f"stub resolver: no such host {host!r}") from None
            seen = sum(1 for h in n.lookups if h.lower() == host.lower())
            addrs = answers[min(seen, len(answers)) - 1]
        out = []
        for a in addrs:
            ip = ipaddress.ip_address(a)
            fam = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            sa = (a, int(port or 0)) if ip.version == 4 else (a, int(port or 0), 0, 0)
            out.append((fam, socket.SOCK_STREAM, 6, "", sa))
        return out

    def check(address):
        if isinstance(address, tuple):
            n.connects.append((str(address[0]), int(address[1])))
            if not _is_loopback(address[0]):
                n.escaped.append((str(address[0]), int(address[1])))
                raise ConnectionRefusedError(f"test safety: connect to non-loopback {address} refused")

    def connect(self, address):
        check(address)
        return real_connect(self, address)

    def connect_ex(self, address):
        check(address)
        return real_connect_ex(self, address)

    def create_connection(address, *a, **k):
        # only the connect to a proxy the user configured uses it; it resolves through the stub and connects
        # through the patched connect, and a non-loopback target is refused here already
        try:
            literal = ipaddress.ip_address(str(address[0]).strip("[]"))
        except ValueError:
            literal = None
        if literal is not None and not _is_loopback(literal):
            n.escaped.append((str(address[0]), int(address[1])))
            raise ConnectionRefusedError(f"test safety: create_connection to non-loopback {address} refused")
        return real_create_connection(address, *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setattr(socket, "getfqdn", lambda name="": name)  # http.server asks for it (a reverse lookup)
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy",
                "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    yield n
    assert not n.escaped, f"a connect to a non-loopback address was attempted: {n.escaped}"


class Counting(ThreadingHTTPServer):
    """A loopback HTTP server that counts requests: /img.png is an image, /to?u=URL redirects (302) to URL;
    any absolute-URL request line (a proxied request) is recorded in `proxied`."""

    daemon_threads = True

    def __init__(self, host: str):
        self.requests: list[str] = []
        self.lock = threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):  # noqa: N802 - stdlib name
                with outer.lock:
                    outer.requests.append(self.path)
                path = self.path.split("://", 1)[-1].split("/", 1)[-1] if "://" in self.path else self.path[1:]
                if path.startswith("to?u="):
                    self.send_response(302)
                    self.send_header("Location", urllib.request.unquote(path[5:]))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(PNG)))
                self.end_headers()
                self.wfile.write(PNG)

        super().__init__((host, 0), H)
        self.base = f"http://{host}:{self.server_address[1]}"
        self.port = self.server_address[1]


@pytest.fixture
def servers(net):
    """(front, victim): counting servers on 127.0.0.2 and 127.0.0.1, started after the stubs are in place."""
    with contextlib.ExitStack() as stack:
        made = []
        for host in ("127.0.0.2", "127.0.0.1"):
            s = Counting(host)
            threading.Thread(target=s.serve_forever, daemon=True).start()
            stack.callback(s.server_close)
            stack.callback(s.shutdown)
            made.append(s)
        yield tuple(made)


def redirect(front: Counting, to: str) -> str:
    return f"{front.base}/to?u={urllib.request.quote(to, safe='')}"


def run_download(tmp_path: Path, rows: list[tuple[str, str]], *flags: str, out: str = "pool"):
    """A real `curate download` (in-process) of (url, caption) rows; returns (exit code, output, meta by caption)."""
    urls = tmp_path / "urls.parquet"
    if not urls.exists():
        pq.write_table(pa.table({"url": [u for u, _ in rows], "text": [t for _, t in rows]}), urls)
    r = CliRunner().invoke(main, ["download", "--urls", str(urls), "--out", str(tmp_path / out), "--distributor",
                                  "multiprocessing", "--processes", "1", "--threads", "4", "--shard-size", "4",
                                  "--image-size", "16", "--timeout", "5", "--no-progress", *flags])
    meta = {}
    if (tmp_path / out / "metadata").exists():
        meta = {m["text"]: m for m in pq.read_table(tmp_path / out / "metadata").to_pylist()}
    return r.exit_code, r.output, meta


def pool_json(tmp_path: Path, out: str = "pool") -> dict:
    return json.loads((tmp_path / out / "pool.json").read_text())


# ------------------------------------------------------------------------------------------------
# the policy: every blocked class, IPv4 and IPv6, plain and hidden in mapped / 6to4 / NAT64 form

BLOCKED = [
    ("127.0.0.1", "loopback"), ("127.255.255.254", "loopback"), ("10.1.2.3", "private"),
    ("172.16.0.1", "private"), ("172.31.255.255", "private"), ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"), ("169.254.170.2", "link-local"),
    ("100.64.0.1", "carrier-grade NAT"), ("100.100.100.200", "carrier-grade NAT"),
    ("0.0.0.0", "this network"), ("0.1.2.3", "this network"), ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"), ("240.0.0.1", "reserved"), ("255.255.255.255", "broadcast"),
    ("192.0.2.1", "documentation"), ("198.51.100.7", "documentation"), ("203.0.113.9", "documentation"),
    ("198.18.0.1", "benchmarking"), ("192.0.0.8", "IETF protocol assignments"), ("192.88.99.1", "6to4 relay"),
    ("::1", "loopback"), ("::", "unspecified"), ("fe80::1", "link-local"), ("fd00:ec2::254", "unique-local"),
    ("fc00::1", "unique-local"), ("ff02::1", "multicast"), ("2001:db8::1", "documentation"),
    ("3fff::1", "documentation"), ("fec0::1", "site-local"), ("2001::1", "Teredo"), ("100::1", "discard"),
    ("::7f00:1", "reserved"),
    ("::ffff:127.0.0.1", "IPv4-mapped form of 127.0.0.1"), ("::ffff:169.254.169.254", "IPv4-mapped form of 169."),
    ("::ffff:10.0.0.1", "IPv4-mapped form of 10.0.0.1"), ("::ffff:0.0.0.0", "IPv4-mapped form of 0.0.0.0"),
    ("2002:7f00:1::", "6to4 form of 127.0.0.1"), ("2002:a9fe:a9fe::1", "6to4 form of 169.254.169.254"),
    ("2002:c0a8:101::", "6to4 form of 192.168.1.1"),
    ("64:ff9b::7f00:1", "NAT64 form of 127.0.0.1"), ("64:ff9b::a9fe:a9fe", "NAT64 form of 169.254.169.254"),
    ("64:ff9b::a00:1", "NAT64 form of 10.0.0.1"), ("64:ff9b::6440:1", "NAT64 form of 100.64.0.1"),
    ("64:ff9b:1::1", "local-use NAT64"),
]


@pytest.mark.parametrize("address,why", BLOCKED, ids=[a for a, _ in BLOCKED])
def test_every_blocked_class_is_refused_with_zero_connects(net, address, why):
    net.answer("victim.test", [address])
    guard = AddressGuard()
    for url in ("http://victim.test:8080/a.png", "https://victim.test/a.png",
                f"http://[{address}]:8080/a.png" if ":" in address else f"http://{address}:8080/a.png"):
        with pytest.raises(urllib.error.URLError) as e:
            guard.opener().open(url, timeout=2)
        reason = blocked_reason(e.value)
        assert reason and reason.startswith(BLOCKED_PREFIX) and why in reason, (url, reason)
    assert net.connects == []


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700::1111", "::ffff:8.8.8.8",
                                     "2002:808:808::1", "64:ff9b::808:808"])
def test_globally_routable_addresses_pass_the_policy(address):
    assert AddressGuard().refusal(address) is None


def test_allow_loopback_and_allow_cidr_widen_only_what_they_name():
    lo = AddressGuard(allow_loopback=True)
    assert [lo.refusal(a) for a in ("127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1")] == [None] * 4
    assert all(lo.refusal(a) for a in ("0.0.0.0", "10.0.0.1", "169.254.169.254", "fe80::1", "100.64.0.1"))
    one = AddressGuard(allow_cidrs=("127.0.0.2/32", "10.20.0.0/16", "fd12::/16"))
    assert [one.refusal(a) for a in ("127.0.0.2", "::ffff:127.0.0.2", "10.20.3.4", "fd12::1")] == [None] * 4
    assert all(one.refusal(a) for a in ("127.0.0.1", "10.21.0.1", "fd13::1", "169.254.169.254"))
    assert one.allow_cidrs == ("127.0.0.2/32", "10.20.0.0/16", "fd12::/16")


def test_a_host_with_mixed_answers_connects_only_to_the_allowed_one(net, servers):
    front, victim = servers
    net.answer("mixed.test", ["10.9.9.9", "169.254.169.254", "127.0.0.2"])
    with AddressGuard(allow_cidrs=("127.0.0.2/32",)).opener().open(f"http://mixed.test:{front.port}/img.png",
                                                                   timeout=5) as r:
        assert r.read() == PNG
    assert net.connects == [("127.0.0.2", front.port)] and victim.requests == []


# ------------------------------------------------------------------------------------------------
# a real `curate download`


def test_blocked_urls_in_a_download_are_recorded_rejections_counted_in_pool_json(net, servers, tmp_path):
    front, victim = servers
    net.answer("metadata.test", ["169.254.169.254"])
    net.answer("internal.test", ["10.0.0.5"])
    rows = [(f"{front.base}/img.png", "allowed mirror"), (f"{victim.base}/img.png", "loopback literal"),
            ("http://metadata.test/latest/meta-data/iam", "cloud metadata by name"),
            ("http://internal.test/admin.png", "private by name"), ("http://169.254.169.254/x.png", "metadata literal"),
            ("ftp://example.com/a.png", "input-level bad url")]
    code, output, meta = run_download(tmp_path, rows, "--allow-cidr", "127.0.0.2/32")
    assert code == 0, output
    assert meta["allowed mirror"]["status"] == "success"
    for caption, why in [("loopback literal", "127.0.0.1 is loopback"),
                         ("cloud metadata by name", "metadata.test: 169.254.169.254 is link-local"),
                         ("private by name", "internal.test: 10.0.0.5 is private"),
                         ("metadata literal", "169.254.169.254 is link-local")]:
        m = meta[caption]
        assert m["status"] == "rejected_bad_url", m
        assert m["error_message"].startswith(BLOCKED_PREFIX) and why in m["error_message"], m
    assert meta["input-level bad url"]["status"] == "rejected_bad_url"
    info = pool_json(tmp_path)
    assert info["state"] == "complete" and info["counts"] == {"success": 1, "rejected_bad_url": 5}
    assert info["address_guard"] == {"allow_loopback": False, "allow_cidrs": ["127.0.0.2/32"], "blocked_rows": 4}
    assert "4 of the rejected_bad_url rows were refused by the address guard" in output
    assert victim.requests == [] and net.connects == [("127.0.0.2", front.port)]

    # --retry-failed re-checks blocked rows under the new policy: loopback now allowed, the rest still refused
    code, output, meta = run_download(tmp_path, rows, "--retry-failed", "--allow-loopback", "--allow-cidr",
                                      "127.0.0.2/32")
    assert code == 0, output
    assert meta["loopback literal"]["status"] == "success" and victim.requests == ["/img.png"]
    assert meta["cloud metadata by name"]["status"] == "rejected_bad_url"
    assert pool_json(tmp_path)["address_guard"]["blocked_rows"] == 3
    assert {h for h, _ in net.connects} == {"127.0.0.2", "127.0.0.1"} and len(front.requests) == 1


def test_redirect_to_a_blocked_address_sends_it_zero_requests(net, servers, tmp_path):
    front, victim = servers
    net.answer("metadata.test", ["169.254.169.254"])
    rows = [(redirect(front, f"{victim.base}/img.png"), "redirect to loopback"),
            (redirect(front, redirect(front, f"http://localhost:{victim.port}/img.png")), "two hops to localhost"),
            (redirect(front, "http://metadata.test/latest/meta-data/"), "redirect to metadata"),
            (redirect(front, f"{front.base}/img.png"), "redirect that stays allowed")]
    net.answer("localhost", ["127.0.0.1", "::1"])
    code, output, meta = run_download(tmp_path, rows, "--allow-cidr", "127.0.0.2/32")
    assert code == 0, output
    assert meta["redirect that stays allowed"]["status"] == "success"
    for caption, why in [("redirect to loopback", "127.0.0.1 is loopback"),
                         ("two hops to localhost", "localhost: 127.0.0.1 is loopback"),
                         ("redirect to metadata", "169.254.169.254 is link-local")]:
        assert meta[caption]["status"] == "rejected_bad_url" and why in meta[caption]["error_message"], meta[caption]
    assert victim.requests == []  # the server on 127.0.0.1 saw nothing
    assert len(front.requests) == 6 and {h for h, _ in net.connects} == {"127.0.0.2"}
    assert pool_json(tmp_path)["address_guard"]["blocked_rows"] == 3


def test_dns_rebinding_connects_to_the_checked_address_never_the_second_answer(net, servers, tmp_path):
    front, victim = servers
    # the first lookup says 127.0.0.2 (allowed), every later one 127.0.0.1 (blocked)
    net.answer("rebind.test", ["127.0.0.2"], ["127.0.0.1"])
    code, output, meta = run_download(tmp_path, [(f"http://rebind.test:{front.port}/img.png", "rebinding")],
                                      "--allow-cidr", "127.0.0.2/32")
    assert code == 0, output
    assert meta["rebinding"]["status"] == "success"
    assert net.lookups.count("rebind.test") == 1  # one lookup: the address checked is the address used
    assert net.connects == [("127.0.0.2", front.port)] and victim.requests == [] and len(front.requests) == 1

    # the same name checked again later: the new answer is checked, and refused, before any connect
    with pytest.raises(urllib.error.URLError) as e:
        AddressGuard(allow_cidrs=("127.0.0.2/32",)).opener().open(f"http://rebind.test:{victim.port}/img.png")
    assert "127.0.0.1 is loopback" in blocked_reason(e.value)
    assert net.connects == [("127.0.0.2", front.port)] and victim.requests == []


def test_allow_loopback_lets_a_loopback_download_work(net, servers, tmp_path):
    _, victim = servers
    rows = [(f"{victim.base}/img.png?{i}", f"served on loopback {i}") for i in range(3)]
    code, output, meta = run_download(tmp_path, rows, out="blocked")
    assert code == 0, output
    assert {m["status"] for m in meta.values()} == {"rejected_bad_url"} and victim.requests == []
    assert "--allow-loopback" in meta["served on loopback 0"]["error_message"]
    code, output, meta = run_download(tmp_path, rows, "--allow-loopback", out="allowed")
    assert code == 0, output
    assert {m["status"] for m in meta.values()} == {"success"} and len(victim.requests) == 3
    assert pool_json(tmp_path, "allowed")["address_guard"]["blocked_rows"] == 0


def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A certificate (its own CA) for DNS name `name` and its key, as PEM files."""
    import datetime

    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem, key_pem = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert_pem, key_pem


def test_https_to_the_checked_address_still_verifies_the_host_name(net, tmp_path):
    import ssl

    cert, key = _self_signed(tmp_path, "tls.test")
    server = Counting("127.0.0.2")
    sni: list[str | None] = []
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    sctx.sni_callback = lambda sock, name, ctx: sni.append(name)
    server.socket = sctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        net.answer("tls.test", ["127.0.0.2"])
        net.answer("other.test", ["127.0.0.2"])
        trust = ssl.create_default_context(cafile=str(cert))
        opener = AddressGuard(allow_cidrs=("127.0.0.2/32",)).opener(tls_context=trust)
        with opener.open(f"https://tls.test:{server.port}/img.png", timeout=5) as r:
            assert r.read() == PNG
        assert sni == ["tls.test"]  # SNI is the host name although the socket went to the checked 127.0.0.2
        for host in ("other.test", "127.0.0.2"):  # same address, wrong name: the certificate check refuses it
            with pytest.raises(urllib.error.URLError, match="certificate verify failed"):
                opener.open(f"https://{host}:{server.port}/img.png", timeout=5)
        assert server.requests == ["/img.png"] and {h for h, _ in net.connects} == {"127.0.0.2"}
    finally:
        server.shutdown()
        server.server_close()


def test_an_environment_proxy_never_carries_a_blocked_target(net, servers, tmp_path, monkeypatch):
    front, victim = servers
    monkeypatch.setenv("http_proxy", front.base)  # the proxy itself is the user's choice: not checked
    monkeypatch.setenv("https_proxy", front.base)  # https goes through a CONNECT tunnel
    net.answer("internal.test", ["10.0.0.5"])
    net.answer("public.test", ["93.184.216.34"])
    guard = AddressGuard()
    for url in ("http://internal.test/secret", "https://internal.test/secret"):
        with pytest.raises(urllib.error.URLError) as e:
            guard.opener().open(url, timeout=5)
        assert "10.0.0.5 is private" in blocked_reason(e.value)
    with pytest.raises(urllib.error.URLError):
        guard.opener().open(f"{victim.base}/img.png", timeout=5)
    assert front.requests == [] and victim.requests == [] and net.connects == []
    with guard.opener().open("http://public.test/img.png", timeout=5) as r:  # checked, then sent to the proxy
        assert r.read() == PNG
    assert front.requests == ["http://public.test/img.png"] and net.connects == [("127.0.0.2", front.port)]


def test_evalsets_download_goes_through_the_guard(net, tmp_path):
    from benchmark.evalsets import DownloadConfig as EvalDownload, download as download_evalsets

    net.answer("huggingface.co", ["10.0.0.7"])
    summary = download_evalsets(EvalDownload(out=tmp_path / "evalsets", tasks=["cars"]))
    (status,) = summary.values()
    assert status.startswith("failed:") and BLOCKED_PREFIX in status and "10.0.0.7 is private" in status
    assert net.connects == []


def test_a_bad_allow_cidr_is_a_clear_error(tmp_path):
    with pytest.raises(CurateError, match=r"--allow-cidr '10.0.0.1/8' is not a CIDR.*did you mean 10.0.0.0/8"):
        DownloadConfig(urls=tmp_path / "u.parquet", out=tmp_path / "p", allow_cidrs=("10.0.0.1/8",))
    (tmp_path / "u.csv").write_text("url,text\nhttp://example.com/a.png,a\n")
    for cmd in (["download", "--urls", str(tmp_path / "u.csv"), "--out", str(tmp_path / "p")],
                ["evalsets", "download", "--out", str(tmp_path / "e")]):
        r = CliRunner().invoke(main, [*cmd, "--allow-cidr", "10.0.0.0/8", "--allow-cidr", "not-a-network"])
        assert r.exit_code == 2 and "--allow-cidr 'not-a-network' is not a CIDR network" in r.output, r.output
        assert "Traceback" not in r.output
    assert not (tmp_path / "p").exists() and not (tmp_path / "e").exists()


def test_blocked_error_is_an_oserror_with_the_prefix():
    err = urllib.error.URLError(BlockedAddressError(f"{BLOCKED_PREFIX}x"))
    assert blocked_reason(err) == f"{BLOCKED_PREFIX}x" and blocked_reason(OSError("other")) is None
