"""Outbound safety (SSRF) for upstream MCP servers: which addresses may be contacted, and an HTTP client
that contacts only those.

Owns: the address policy (`blocked_reason`, pure), resolving a host and checking every address
(`resolve_checked`), the registration-time URL check (`validate_endpoint_url`, makes no connection) and
the connect-time guard (`guarded_http_client`, `sse_client_factory`). The guard resolves the host at
connect time, checks every address, then connects to exactly a checked address, so no DNS answer can
change between the check and the connection. The HTTP `Host` header, TLS SNI and certificate
verification still use the hostname. Any 3xx answer raises `RedirectRefused`: redirects are never
followed, not even the same-origin ones the MCP SDK would follow on its own.

Must not: read settings (callers pass the parsed `allowed` networks), log credentials, or report the
addresses a name resolved to (that would turn registration into an internal DNS oracle).

Policy for IPv6 forms that embed an IPv4 address:
- IPv4-mapped `::ffff:a.b.c.d` and NAT64 `64:ff9b::/96` reach exactly the embedded IPv4 address, so the
  embedded address decides: `64:ff9b::808:808` is allowed like 8.8.8.8, `64:ff9b::a9fe:a9fe` is blocked
  like 169.254.169.254.
- IPv4-compatible `::a.b.c.d`, 6to4 `2002::/16` and Teredo `2001::/32` (server and client fields) are
  blocked when an embedded address is blocked, and otherwise judged as IPv6 addresses: 6to4 of a global
  address passes, IPv4-compatible (reserved) and Teredo (not globally reachable) never do.
- The local-use NAT64 prefix `64:ff9b:1::/48` is blocked outright: it is not globally reachable and its
  embedding depends on the operator's prefix length.
An address inside one of the `allowed` networks is allowed whatever it is, cloud metadata included.
"""

from __future__ import annotations

import ipaddress
import math
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence

import anyio
import httpcore2
import httpx2

from scailink_mcp.errors import EndpointForbidden
from scailink_mcp.sdk_sessions import MCP_DEFAULT_SSE_READ_TIMEOUT, MCP_DEFAULT_TIMEOUT, McpHttpClientFactory

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]

_net = ipaddress.ip_network

_CLOUD_METADATA: dict[IPAddress, str] = {
    ipaddress.ip_address("169.254.169.254"): "link-local address (cloud metadata)",
    ipaddress.ip_address("169.254.170.2"): "link-local address (cloud metadata)",
    ipaddress.ip_address("100.100.100.200"): "shared address space (cloud metadata)",
    ipaddress.ip_address("fd00:ec2::254"): "unique-local address (cloud metadata)",
}

_NAT64 = _net("64:ff9b::/96")
_NAT64_LOCAL = _net("64:ff9b:1::/48")

# Checked after the address flags (loopback, link-local, ...), before the catch-all "not global".
_NAMED_RANGES: tuple[tuple[Network, str], ...] = (
    (_net("100.64.0.0/10"), "shared address space (CGNAT)"),
    (_net("10.0.0.0/8"), "private address (RFC 1918)"),
    (_net("172.16.0.0/12"), "private address (RFC 1918)"),
    (_net("192.168.0.0/16"), "private address (RFC 1918)"),
    (_net("255.255.255.255/32"), "broadcast address"),
    (_net("fc00::/7"), "unique-local address"),
    (_net("fec0::/10"), "site-local address"),
    (_NAT64_LOCAL, "local-use NAT64 address"),
    (_net("2001::/32"), "Teredo address (not globally reachable)"),
)

_IPV4_COMPATIBLE = _net("::/96")


class HostResolutionError(OSError):
    """The host name did not resolve. Distinct from `EndpointForbidden`: nothing was judged unsafe, so
    registration may store the server (discovery then fails) while connecting fails as usual."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"cannot resolve host {host!r}: {reason}")
        self.host = host


class RedirectRefused(httpx2.HTTPError):
    """An upstream answered with a 3xx. Redirects are never followed: the endpoint is the registered
    URL and nothing else, so the answer is an error, even for the same origin."""

    @classmethod
    def of(cls, status: int, base: httpx2.URL, location: str) -> RedirectRefused:
        return cls(
            f"upstream answered {status} {redacted_location(base, location)}; "
            "redirects are not followed, register the final URL instead"
        )


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, list[ipaddress.IPv4Address], bool]:
    """(form, embedded addresses, whether they alone decide) for IPv6 forms that carry an IPv4 address."""
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", [ip.ipv4_mapped], True
    if ip in _NAT64:
        return "NAT64", [low32], True
    if ip.sixtofour is not None:
        return "6to4", [ip.sixtofour], False
    if ip.teredo is not None:
        server, client = ip.teredo
        return "Teredo", [client, server], False
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:  # `::` and `::1` are their own cases
        return "IPv4-compatible", [low32], False
    if ip in _NAT64_LOCAL:  # blocked anyway; this only names the embedded address if it is the problem
        return "NAT64", [low32], False
    return "", [], False


def blocked_reason(ip: IPAddress, allowed: Sequence[Network]) -> str | None:
    """Why `ip` must not be contacted, or None if it may be. Pure; the rules are in the module docstring."""
    if any(ip in network for network in allowed):
        return None
    if ip in _CLOUD_METADATA:
        return _CLOUD_METADATA[ip]
    if isinstance(ip, ipaddress.IPv6Address):
        form, embedded, decisive = _embedded_ipv4(ip)
        for inner in embedded:
            reason = blocked_reason(inner, allowed)
            if reason is not None:
                return f"{form} address embedding {reason}"
        if embedded and decisive:
            return None
    if ip.is_unspecified:
        return "unspecified address"
    if ip.is_loopback:
        return "loopback address"
    if ip.is_link_local:
        return "link-local address"
    if ip.is_multicast:
        return "multicast address"
    for network, reason in _NAMED_RANGES:
        if ip in network:
            return reason
    if ip.is_reserved:
        return "reserved address"
    if not ip.is_global:
        return "non-global address (special-purpose range)"
    return None


def parse_ip_literal(host: str) -> IPAddress | None:
    """`host` as an IP address if it is a literal (IPv6 with or without brackets), else None."""
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return None


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    """Every TCP address the system resolver gives for `host`, in its order, without duplicates."""
    try:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:  # socket.gaierror; IDNA errors are UnicodeErrors
        raise HostResolutionError(host, str(exc) or type(exc).__name__) from exc
    addresses: list[IPAddress] = []
    for family, _type, _proto, _canonname, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = ipaddress.ip_address(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


async def resolve_checked(
    host: str, port: int, allowed: Sequence[Network], *, resolver: Resolver = system_resolver
) -> list[IPAddress]:
    """Resolve `host` (a literal IP is not resolved) and return its addresses if every one is allowed.

    Raises `EndpointForbidden` if ANY address is blocked (a name with one bad answer is refused, not
    filtered), and `HostResolutionError` if the name does not resolve to any address.
    """
    literal = parse_ip_literal(host)
    addresses = [literal] if literal is not None else await resolver(host, port)
    if not addresses:
        raise HostResolutionError(host, "no addresses")
    for address in addresses:
        reason = blocked_reason(address, allowed)
        if reason is not None:
            raise EndpointForbidden(
                f"endpoint host {host!r} resolves to a blocked address: {reason}",
                details={"host": host, "reason": reason},
            )
    return addresses


async def validate_endpoint_url(
    url: str, allowed: Sequence[Network], *, resolver: Resolver = system_resolver
) -> None:
    """Registration-time check of an endpoint URL; makes no connection.

    Raises `EndpointForbidden` for a scheme other than http/https, a missing host, or a host with any
    blocked address. A host that does not resolve passes: it is not known to be unsafe, registration
    then stores the server with a failed discovery, and every later connection is checked again.
    """
    try:
        parsed = httpx2.URL(url)
    except httpx2.InvalidURL as exc:
        raise EndpointForbidden("endpoint_url is not a valid URL", details={"reason": str(exc)}) from exc
    if parsed.scheme not in ("http", "https"):
        raise EndpointForbidden(
            "endpoint_url must use http or https", details={"reason": f"scheme {parsed.scheme!r}"}
        )
    host = parsed.raw_host.decode("ascii")
    if not host:
        raise EndpointForbidden("endpoint_url has no host", details={"reason": "missing host"})
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        await resolve_checked(host, port, allowed, resolver=resolver)
    except HostResolutionError:
        return


class CoalescedStream(httpcore2.AsyncNetworkStream):
    """A connection whose writes are held until the next read (or `HOLD_BYTES`), so a request's head
    and body leave in one send.

    Why: httpcore writes a request's head and its body separately; each send is a packet and a
    wake-up of the upstream, and profiled (issue 14) the socket sends were the largest part of
    ScaiLink's CPU per warm call. Nothing can wait on a held write: HTTP/1.1 reads before it expects
    anything of the server, and every read sends what is held first.
    """

    HOLD_BYTES = 64 * 1024

    def __init__(self, inner: httpcore2.AsyncNetworkStream) -> None:
        self._inner = inner
        self._held = bytearray()
        self._timeout: float | None = None

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        self._held += buffer
        self._timeout = timeout
        if len(self._held) >= self.HOLD_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        if self._held:
            data, self._held = bytes(self._held), bytearray()
            await self._inner.write(data, timeout=self._timeout)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        await self._flush()
        return await self._inner.read(max_bytes, timeout=timeout)

    async def aclose(self) -> None:
        self._held.clear()
        await self._inner.aclose()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore2.AsyncNetworkStream:
        await self._flush()
        return CoalescedStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> object:
        return self._inner.get_extra_info(info)


class GuardedNetworkBackend(httpcore2.AsyncNetworkBackend):
    """An httpcore network backend that connects only to checked addresses.

    httpcore hands `connect_tcp` the URL's host; this resolves it once, refuses the connection if any
    address is blocked, and connects to the checked IP. TLS is started afterwards by httpcore with the
    hostname as `server_hostname`, so SNI and certificate checks are unaffected.
    """

    def __init__(self, allowed: Sequence[Network], *, resolver: Resolver = system_resolver) -> None:
        self._allowed = list(allowed)
        self._resolver = resolver
        self._inner = httpcore2.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore2.SOCKET_OPTION] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        # The connect timeout covers resolution and every attempt together.
        deadline = math.inf if timeout is None else anyio.current_time() + timeout
        try:
            with anyio.fail_after(timeout):
                addresses = await resolve_checked(host, port, self._allowed, resolver=self._resolver)
        except TimeoutError as exc:
            raise httpcore2.ConnectTimeout(f"resolving {host!r} timed out") from exc
        failure: Exception | None = None
        for address in addresses:
            remaining = None if timeout is None else max(deadline - anyio.current_time(), 0.0)
            try:
                stream = await self._inner.connect_tcp(
                    str(address),
                    port,
                    timeout=remaining,
                    local_address=local_address,
                    socket_options=socket_options,
                )
                return CoalescedStream(stream)
            except (httpcore2.ConnectError, httpcore2.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None  # resolve_checked never returns an empty list
        raise failure

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


class GuardedTransport(httpx2.AsyncHTTPTransport):
    """httpx2's transport on a `GuardedNetworkBackend`, refusing every 3xx answer.

    No proxy and no environment: a proxy would make the checked address the proxy's, not the upstream's.
    """

    def __init__(
        self,
        allowed: Sequence[Network],
        *,
        resolver: Resolver = system_resolver,
        verify: ssl.SSLContext | bool = True,
        limits: httpx2.Limits | None = None,
    ) -> None:
        ssl_context = httpx2.create_ssl_context(verify=verify, trust_env=False)
        limits = limits or httpx2.Limits(max_connections=100, max_keepalive_connections=20)
        super().__init__(verify=ssl_context, trust_env=False, limits=limits)
        # httpx2 has no network-backend knob, so the pool it built is replaced by an equal one that
        # connects through the guard. `_pool` is what `handle_async_request` sends through.
        self._pool = httpcore2.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedNetworkBackend(allowed, resolver=resolver),
        )

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await super().handle_async_request(request)
        if 300 <= response.status_code < 400:
            await response.aclose()
            exc = RedirectRefused.of(response.status_code, request.url, response.headers.get("location", ""))
            exc.request = request
            raise exc
        return response


def redacted_location(base: httpx2.URL, location: str) -> str:
    """Where a redirect points, without userinfo, query or fragment (they can carry secrets)."""
    if not location:
        return "without a Location"
    try:
        target = base.join(location).copy_with(userinfo=b"", query=None, fragment=None)
    except httpx2.InvalidURL:
        return "to an invalid Location"
    return f"to {target}"


def guarded_http_client(
    allowed: Sequence[Network],
    *,
    headers: dict[str, str] | None = None,
    timeout: httpx2.Timeout | None = None,
    auth: httpx2.Auth | None = None,
    resolver: Resolver = system_resolver,
    verify: ssl.SSLContext | bool = True,
) -> httpx2.AsyncClient:
    """An `httpx2.AsyncClient` for upstream MCP traffic: checked connections, no redirects, no proxies.

    `timeout` defaults to the MCP SDK's (30 s, 300 s reads). Use it as an async context manager.
    """
    return httpx2.AsyncClient(
        headers=headers,
        timeout=timeout or httpx2.Timeout(MCP_DEFAULT_TIMEOUT, read=MCP_DEFAULT_SSE_READ_TIMEOUT),
        auth=auth,
        transport=GuardedTransport(allowed, resolver=resolver, verify=verify),
        follow_redirects=False,
        trust_env=False,
    )


def sse_client_factory(
    allowed: Sequence[Network], *, resolver: Resolver = system_resolver
) -> McpHttpClientFactory:
    """A factory for `mcp.client.sse.sse_client(httpx_client_factory=...)` making guarded clients."""

    def factory(
        headers: dict[str, str] | None = None,
        timeout: httpx2.Timeout | None = None,
        auth: httpx2.Auth | None = None,
    ) -> httpx2.AsyncClient:
        return guarded_http_client(allowed, headers=headers, timeout=timeout, auth=auth, resolver=resolver)

    return factory
