"""The address guard: no fetch the project makes reaches an address that is not globally routable.

A URL list is untrusted input. A downloader run inside a cloud network that fetches whatever a row says
will fetch internal services and the cloud metadata endpoint (169.254.169.254) for anyone who can put a
row in the list (server-side request forgery). So every fetch (`curate download`, each of its redirects,
`curate evalsets download`) goes through this guard:

1. The host is resolved once (`socket.getaddrinfo`). Every address is unmapped first (IPv4-mapped
   ``::ffff:a.b.c.d``, 6to4 ``2002:AABB:CCDD::/48`` and NAT64 ``64:ff9b::a.b.c.d``, which all reach the IPv4
   address inside them) and then refused unless it is globally routable: loopback, private (RFC 1918,
   unique-local), link-local (cloud metadata), shared CGNAT space 100.64.0.0/10, 0.0.0.0/8, multicast,
   reserved, unspecified, documentation and benchmarking ranges, Teredo, site-local. Python's `ipaddress`
   decides most of it (`is_global` and friends); the table below adds what `is_global` calls global
   although it is not (multicast, 192.88.99.0/24, fec0::/10, 3fff::/20, the NAT64 and mapped forms).
2. The connection goes to an address that was checked, never to a second DNS answer (DNS rebinding: a name
   that resolves to a public address for the check and to 127.0.0.1 for the connect). The HTTP layer is
   the standard library's: `GuardedHTTPConnection` / `GuardedHTTPSConnection` only replace the TCP connect
   of `http.client`, so the Host header, TLS SNI and certificate verification still use the host name.
3. Every redirect is a new request through the same handlers, so it is checked again before any packet.
4. `allow_loopback` allows 127.0.0.0/8 and ::1 (the offline demo and the tests serve on loopback);
   `allow_cidrs` allows given networks (a user crawling an internal mirror). Nothing else is allowed.

Proxies from the environment (`http_proxy`, `https_proxy`, `no_proxy`, as urllib reads them) are honoured,
and the guard applies to the *target* host: it is resolved and checked before every request and redirect,
and a blocked target is refused before the proxy is contacted. The proxy's own address is not checked (the
user configured it). Through a proxy the proxy makes its own DNS lookup, so the address pinning of point 2
holds for direct connections only; unset the proxy variables (or enforce the same policy at the proxy) where
that matters.

Hand-written because nothing we use has it: img2dataset fetches with urllib's default opener and checks
no address, `requests`/urllib3 have no address policy hook, and the SSRF-filter packages on PyPI
(`advocate`, a `requests` wrapper) had its last release in 2020. The policy itself is a few lines over
`ipaddress`; the connect-to-the-checked-address part is a small subclass of `http.client`'s connections.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import socket
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Iterable, Union
from urllib.parse import urlsplit

from curate.core.errors import CurateError

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

# Every refusal message starts with this, so a caller can tell a blocked fetch from a failed one.
BLOCKED_PREFIX = "blocked by the address guard: "

_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix: the last 32 bits are IPv4

# What the guard refuses, by name (first match names the reason). `is_global` alone misses some of these.
_RANGES: list[tuple[IPNetwork, str]] = [(ipaddress.ip_network(n), why) for n, why in [
    ("0.0.0.0/8", "'this network' (0.0.0.0/8; 0.0.0.0 reaches this machine)"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "shared address space (carrier-grade NAT, RFC 6598; some clouds serve metadata here)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata endpoints such as 169.254.169.254 live here)"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments (RFC 6890)"),
    ("192.0.2.0/24", "documentation (TEST-NET-1)"),
    ("192.88.99.0/24", "deprecated 6to4 relay anycast"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("198.18.0.0/15", "benchmarking (RFC 2544)"),
    ("198.51.100.0/24", "documentation (TEST-NET-2)"),
    ("203.0.113.0/24", "documentation (TEST-NET-3)"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("64:ff9b:1::/48", "local-use NAT64 (RFC 8215)"),
    ("100::/64", "discard-only (RFC 6666)"),
    ("2001::/32", "a Teredo tunnel address"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation (RFC 9637)"),
    ("5f00::/16", "SRv6 segment identifiers"),
    ("fc00::/7", "unique-local (private)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
]]


class BlockedAddressError(OSError):
    """A fetch the guard refused; the message starts with BLOCKED_PREFIX and names host, address and reason.

    An OSError so that urllib wraps it like any connection failure (URLError), and `blocked_reason` finds it.
    """


def blocked_reason(err: BaseException | None) -> str | None:
    """The guard's message if `err` is (or wraps, as urllib's URLError does) a BlockedAddressError."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, BlockedAddressError):
            return str(err)
        reason = getattr(err, "reason", None)
        err = reason if isinstance(reason, BaseException) else (err.__cause__ or err.__context__)
    return None


def unmap(ip: IPAddress) -> tuple[IPAddress, str | None]:
    """The address a packet to `ip` really reaches, and the form it was hidden in (or None)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped, "IPv4-mapped"
        if ip.sixtofour is not None:
            return ip.sixtofour, "6to4"
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64"
    return ip, None


def classify(ip: IPAddress) -> str | None:
    """Why `ip` (already unmapped) is not globally routable, or None if it is."""
    for net, why in _RANGES:
        if ip.version == net.version and ip in net:
            return why
    for attr, why in (("is_unspecified", "unspecified"), ("is_loopback", "loopback"),
                      ("is_link_local", "link-local"), ("is_multicast", "multicast"), ("is_private", "private"),
                      ("is_reserved", "reserved"), ("is_site_local", "site-local (deprecated)")):
        if getattr(ip, attr, False):
            return why
    if not ip.is_global:
        return "not globally routable"
    return None


def parse_cidrs(values: Iterable[str], option: str = "--allow-cidr") -> tuple[IPNetwork, ...]:
    """Networks from user text ('10.0.0.0/8', 'fd00::/8', a bare address = one host); a CurateError for bad text."""
    out = []
    for v in values:
        text = str(v).strip()
        try:
            out.append(ipaddress.ip_network(text, strict=True))
        except ValueError as e:
            hint = ""
            try:
                hint = f"; did you mean {ipaddress.ip_network(text, strict=False)}?"
            except ValueError:
                pass
            raise CurateError(f"{option} {v!r} is not a CIDR network such as 10.1.0.0/16 or fd00::/8 ({e}){hint}") from None
    return tuple(out)


@dataclass(frozen=True)
class AddressGuard:
    """The policy: which resolved addresses a fetch may connect to. Picklable (Ray / worker processes)."""

    allow_loopback: bool = False
    allow_cidrs: tuple[str, ...] = ()
    networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        nets = parse_cidrs(self.allow_cidrs)
        object.__setattr__(self, "allow_cidrs", tuple(str(n) for n in nets))
        object.__setattr__(self, "networks", nets)

    def refusal(self, address: str | IPAddress) -> str | None:
        """Why a connection to `address` is refused, or None if it is allowed."""
        ip = address if not isinstance(address, str) else ipaddress.ip_address(address.split("%", 1)[0])
        real, form = unmap(ip)
        if any(a.version == n.version and a in n for n in self.networks for a in (ip, real)):
            return None
        if self.allow_loopback and real.is_loopback:
            return None
        why = classify(real)
        if why is None:
            return None
        shown = f"{ip} ({form} form of {real})" if form else str(ip)
        how = "--allow-loopback" if real.is_loopback else "--allow-cidr"
        return f"{shown} is {why}, not a globally routable address (allow it with {how})"

    def resolve(self, host: str, port: int) -> list[tuple]:
        """getaddrinfo's answers for (host, port) that the policy allows; BlockedAddressError if there are none.

        Blocked answers are dropped (never connected to); the others are returned in resolver order.
        """
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        allowed, refused = [], []
        for info in infos:
            why = self.refusal(str(info[4][0]))
            (refused if why else allowed).append((info, why))
        if not allowed:
            if not refused:
                raise BlockedAddressError(f"{BLOCKED_PREFIX}{host} resolved to no address")
            first = refused[0][1]
            more = len({str(info[4][0]) for info, _ in refused}) - 1
            where = "" if first.startswith(f"{host} ") else f"{host}: "
            raise BlockedAddressError(f"{BLOCKED_PREFIX}{where}{first}"
                                      + (f" (and {more} more refused address(es))" if more else ""))
        return [info for info, _ in allowed]

    def create_connection(self, host: str, port: int, timeout=None, source_address=None) -> socket.socket:
        """Like socket.create_connection, but only to the checked addresses of one lookup."""
        last: OSError | None = None
        for family, type_, proto, _, sockaddr in self.resolve(host, port):
            sock = socket.socket(family, type_, proto)
            try:
                if timeout is None or isinstance(timeout, (int, float)):  # else socket's "default timeout" sentinel
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as e:
                sock.close()
                last = e
        raise last if last is not None else OSError(f"cannot connect to {host}:{port}")

    def opener(self, redirects: urllib.request.HTTPRedirectHandler | None = None,
               tls_context: ssl.SSLContext | None = None) -> urllib.request.OpenerDirector:
        """A urllib opener with only http(s), environment proxies, this guard on every connect, and `redirects`.

        No file://, ftp:// or data: handlers (unlike urllib's default opener). `tls_context` replaces the
        default verifying context (e.g. one that trusts an internal mirror's CA).
        """
        opener = urllib.request.OpenerDirector()
        for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), GuardedHTTPHandler(self),
                        GuardedHTTPSHandler(self, tls_context), urllib.request.HTTPDefaultErrorHandler(),
                        redirects or urllib.request.HTTPRedirectHandler(), urllib.request.HTTPErrorProcessor()):
            opener.add_handler(handler)
        return opener


# --------------------------------------------------------------------------------------------------
# urllib / http.client integration


class LimitedRedirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirect handler with a hop limit, following only `schemes` targets.

    Each hop is a new request through the opener's guarded handlers, so its host is checked again.
    """

    def __init__(self, max_redirects: int, schemes: tuple[str, ...] = ("http", "https")):
        self.max_redirections = max_redirects
        self.inf_msg = f"more than {max_redirects} redirects: "
        self.schemes = schemes
        self.label = "http(s)" if set(schemes) == {"http", "https"} else "/".join(schemes)

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlsplit(newurl).scheme.lower() not in self.schemes:
            raise urllib.error.HTTPError(newurl, code, f"redirect to a non-{self.label} URL refused",
                                         headers, fp)
        if self.max_redirections == 0:
            raise urllib.error.HTTPError(req.full_url, code, "redirects are disabled (--max-redirects 0)", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _GuardedConnection:
    """Mixin for http.client's connections: the TCP connect goes through the guard.

    http.client opens its socket through the instance attribute `_create_connection` (so that subclasses
    can replace it; HTTPSConnection then wraps the socket in TLS for `self.host`, the host name). A direct
    connection connects to the checked addresses of its own host. Through a proxy (`proxied`: a plain-http
    proxy request, or a CONNECT tunnel set by urllib), `target` (the URL's host and port) is checked before
    the proxy is contacted, and the socket goes to the proxy.
    """

    def __init__(self, *args, guard: AddressGuard, target: tuple[str, int], proxied: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard, self.target, self.proxied = guard, target, proxied
        self._create_connection = self._guarded_connect

    def _guarded_connect(self, address, timeout=None, source_address=None):
        if self.proxied or getattr(self, "_tunnel_host", None):
            self.guard.resolve(*self.target)
            return socket.create_connection(address, timeout, source_address)
        return self.guard.create_connection(address[0], address[1], timeout, source_address)


class GuardedHTTPConnection(_GuardedConnection, http.client.HTTPConnection):
    pass


class GuardedHTTPSConnection(_GuardedConnection, http.client.HTTPSConnection):
    pass


def _target(req: urllib.request.Request, default_port: int) -> tuple[str, int]:
    parts = urlsplit(req.full_url)
    return (parts.hostname or ""), (parts.port or default_port)


class GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, guard: AddressGuard):
        super().__init__()
        self.guard = guard

    def http_open(self, req):
        return self.do_open(functools.partial(GuardedHTTPConnection, guard=self.guard, target=_target(req, 80),
                                              proxied=req.has_proxy()), req)


@functools.lru_cache(maxsize=1)
def default_tls_context() -> ssl.SSLContext:
    """The verifying TLS context, made once per process: loading the CA bundle costs ~30 ms, and an opener is
    made per fetch. SSLContext objects may be shared between threads and connections."""
    return ssl.create_default_context()


class GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    """HTTPS with the default verifying TLS context (certificate and host name checked against the URL's host)."""

    def __init__(self, guard: AddressGuard, context: ssl.SSLContext | None = None):
        super().__init__(context=context)
        self.tls, self.guard = context, guard

    def https_open(self, req):
        return self.do_open(functools.partial(GuardedHTTPSConnection, guard=self.guard, target=_target(req, 443),
                                              proxied=req.has_proxy()), req, context=self.tls or default_tls_context())
