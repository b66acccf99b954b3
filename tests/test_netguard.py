"""The SSRF guard: the address policy (table-driven), resolution, endpoint URL validation, and the guarded
client against real servers on 127.0.0.1 (refused connections never reach the socket; redirects are never
followed, also through the MCP SDK's own transports)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
import httpx2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mcp.client.session import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp.shared._httpx_utils import create_mcp_http_client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from scailink_mcp.errors import EndpointForbidden
from scailink_mcp.remote.netguard import (
    HostResolutionError,
    IPAddress,
    Network,
    RedirectRefused,
    Resolver,
    blocked_reason,
    guarded_http_client,
    resolve_checked,
    sse_client_factory,
    system_resolver,
    validate_endpoint_url,
)
from tests.servers import ThreadedServer

LOOPBACK: list[Network] = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
NOTHING: list[Network] = []
TEREDO_METADATA = "2001:0:4136:e378:8000:63bf:5601:5601"  # client field = ~0x56015601 = 169.254.169.254


# --- the address policy -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("169.254.169.254", "link-local address (cloud metadata)"),
        ("fd00:ec2::254", "unique-local address (cloud metadata)"),
        ("10.0.0.1", "private address (RFC 1918)"),
        ("172.16.0.1", "private address (RFC 1918)"),
        ("192.168.1.1", "private address (RFC 1918)"),
        ("127.0.0.1", "loopback address"),
        ("::1", "loopback address"),
        ("::ffff:127.0.0.1", "IPv4-mapped address embedding loopback address"),
        ("::ffff:169.254.169.254", "IPv4-mapped address embedding link-local address (cloud metadata)"),
        ("64:ff9b::a9fe:a9fe", "NAT64 address embedding link-local address (cloud metadata)"),
        ("64:ff9b:1::808:808", "local-use NAT64 address"),
        ("2002:a9fe:a9fe::1", "6to4 address embedding link-local address (cloud metadata)"),
        (TEREDO_METADATA, "Teredo address embedding link-local address (cloud metadata)"),
        ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", "Teredo address (not globally reachable)"),  # client 8.8.8.8
        ("::10.0.0.1", "IPv4-compatible address embedding private address (RFC 1918)"),
        ("::8.8.8.8", "reserved address"),
        ("100.64.0.1", "shared address space (CGNAT)"),
        ("224.0.0.1", "multicast address"),
        ("ff02::1", "multicast address"),
        ("0.0.0.0", "unspecified address"),
        ("::", "unspecified address"),
        ("fe80::1", "link-local address"),
        ("169.254.1.1", "link-local address"),
        ("fc00::1", "unique-local address"),
        ("fec0::1", "site-local address"),
        ("255.255.255.255", "broadcast address"),
        ("240.0.0.1", "reserved address"),
        ("192.0.2.1", "non-global address (special-purpose range)"),
        ("2001:db8::1", "non-global address (special-purpose range)"),
        ("8.8.8.8", None),
        ("2606:4700::1111", None),
        ("::ffff:8.8.8.8", None),  # reaches exactly 8.8.8.8
        ("64:ff9b::808:808", None),  # NAT64 to a global address
        ("2002:808:808::1", None),  # 6to4 through a global relay address
    ],
)
def test_blocked_reason_without_allowed_networks(address: str, reason: str | None) -> None:
    assert blocked_reason(ipaddress.ip_address(address), NOTHING) == reason


@pytest.mark.parametrize(
    ("address", "allowed", "blocked"),
    [
        ("127.0.0.1", ["127.0.0.0/8"], False),
        ("127.0.0.1", ["10.0.0.0/8"], True),
        ("::ffff:127.0.0.1", ["127.0.0.0/8"], False),  # the mapped form reaches the allowed address
        ("::1", ["127.0.0.0/8"], True),  # an IPv4 network never allows an IPv6 address
        ("10.1.2.3", ["10.1.0.0/16"], False),
        ("10.2.0.1", ["10.1.0.0/16"], True),
        ("169.254.169.254", ["169.254.169.254/32"], False),  # an explicit allowance wins, metadata too
        ("fd00:ec2::254", ["fd00::/8"], False),
    ],
)
def test_blocked_reason_honours_allowed_networks(address: str, allowed: list[str], blocked: bool) -> None:
    networks = [ipaddress.ip_network(cidr) for cidr in allowed]
    assert (blocked_reason(ipaddress.ip_address(address), networks) is not None) is blocked


# --- resolution and URL validation ----------------------------------------------------------------------


def fixed_resolver(answers: dict[str, list[str]], fallback: Resolver | None = None) -> Resolver:
    """A resolver answering from a table; any other name goes to `fallback` or fails like an unknown name."""

    async def resolve(host: str, port: int) -> list[IPAddress]:
        if host in answers:
            return [ipaddress.ip_address(a) for a in answers[host]]
        if fallback is not None:
            return await fallback(host, port)
        raise HostResolutionError(host, "unknown in this test")

    return resolve


async def unused_resolver(host: str, port: int) -> list[IPAddress]:
    raise AssertionError(f"{host} is a literal and must not be resolved")


@pytest.mark.anyio
async def test_resolve_checked_refuses_a_name_with_any_blocked_address() -> None:
    resolver = fixed_resolver(
        {"mixed.test": ["8.8.8.8", "10.0.0.7"], "public.test": ["8.8.8.8", "2606:4700::1"]}
    )
    with pytest.raises(EndpointForbidden) as info:
        await resolve_checked("mixed.test", 80, NOTHING, resolver=resolver)
    assert info.value.details == {"host": "mixed.test", "reason": "private address (RFC 1918)"}
    assert "10.0.0.7" not in str(info.value)  # no internal DNS oracle
    addresses = await resolve_checked("public.test", 80, NOTHING, resolver=resolver)
    assert [str(a) for a in addresses] == ["8.8.8.8", "2606:4700::1"]


@pytest.mark.anyio
async def test_resolve_checked_does_not_resolve_literals() -> None:
    assert await resolve_checked("8.8.8.8", 80, NOTHING, resolver=unused_resolver) == [
        ipaddress.ip_address("8.8.8.8")
    ]
    assert await resolve_checked("[::1]", 80, LOOPBACK, resolver=unused_resolver) == [
        ipaddress.ip_address("::1")
    ]
    with pytest.raises(EndpointForbidden):
        await resolve_checked("::ffff:a9fe:a9fe", 80, NOTHING, resolver=unused_resolver)


@pytest.mark.anyio
async def test_resolution_failures_are_host_resolution_errors() -> None:
    with anyio.fail_after(10):
        with pytest.raises(HostResolutionError) as info:
            await resolve_checked("no-such-host.invalid", 80, NOTHING)
        assert info.value.host == "no-such-host.invalid"
        with pytest.raises(HostResolutionError):
            await resolve_checked("empty.test", 80, NOTHING, resolver=fixed_resolver({"empty.test": []}))


@pytest.mark.anyio
async def test_system_resolver_checks_what_localhost_resolves_to() -> None:
    with anyio.fail_after(10):
        with pytest.raises(EndpointForbidden) as info:
            await resolve_checked("localhost", 80, NOTHING)
        assert info.value.details["reason"] == "loopback address"
        assert all(a.is_loopback for a in await resolve_checked("localhost", 80, LOOPBACK))


@pytest.mark.anyio
@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data",
        "http://[fd00:ec2::254]/",
        "https://10.0.0.5/mcp",
        "http://[::ffff:169.254.169.254]/",
        "http://[64:ff9b::a9fe:a9fe]/",
        f"http://[{TEREDO_METADATA}]/",
        "http://0.0.0.0/",
        "http://2130706433/",  # 127.0.0.1 as one decimal number, which the system resolver accepts
        "http://localhost:8080/mcp",
        "http://metadata.test/",
        "ftp://8.8.8.8/",
        "file:///etc/passwd",
        "http:///nohost",
        "http://[::1/",
    ],
)
async def test_validate_endpoint_url_refuses(url: str) -> None:
    with anyio.fail_after(10), pytest.raises(EndpointForbidden):
        resolver = fixed_resolver({"metadata.test": ["169.254.169.254"]}, fallback=system_resolver)
        await validate_endpoint_url(url, NOTHING, resolver=resolver)


@pytest.mark.anyio
async def test_validate_endpoint_url_accepts_global_and_unresolvable_hosts() -> None:
    resolver = fixed_resolver({"mcp.example.test": ["8.8.4.4"]})
    await validate_endpoint_url("https://mcp.example.test/mcp", NOTHING, resolver=resolver)
    await validate_endpoint_url("http://[2606:4700::1111]:8443/mcp", NOTHING, resolver=unused_resolver)
    # Not known to be unsafe: registration stores it and discovery fails; connections re-check.
    await validate_endpoint_url("https://not-yet-in-dns.test/mcp", NOTHING, resolver=resolver)
    await validate_endpoint_url("http://127.0.0.1:9/mcp", LOOPBACK, resolver=unused_resolver)


# --- real servers on 127.0.0.1 --------------------------------------------------------------------------


@dataclass
class PlainUpstream:
    port: int
    hits: Counter[str] = field(default_factory=Counter)

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"


def plain_app(hits: Counter[str]) -> Starlette:
    async def hello(request: Request) -> Response:
        hits["hello"] += 1
        return PlainTextResponse("hi")

    async def host(request: Request) -> Response:
        return PlainTextResponse(request.headers["host"])

    async def redirect(request: Request) -> Response:
        hits["redirect"] += 1
        return RedirectResponse(
            f"/target?token=secret-{request.path_params['code']}", request.path_params["code"]
        )

    async def target(request: Request) -> Response:
        hits[request.url.path] += 1
        return PlainTextResponse("followed")

    async def mcp_redirect(request: Request) -> Response:
        hits["mcp"] += 1
        return RedirectResponse("/real-mcp", 307)

    methods = ["GET", "POST", "DELETE"]
    return Starlette(
        routes=[
            Route("/hello", hello),
            Route("/host", host),
            Route("/redirect/{code:int}", redirect, methods=methods),
            Route("/target", target, methods=methods),
            Route("/real-mcp", target, methods=methods),
            Route("/mcp", mcp_redirect, methods=methods),
        ]
    )


@pytest.fixture(scope="module")
def plain_server() -> Iterator[PlainUpstream]:
    hits: Counter[str] = Counter()
    with ThreadedServer(plain_app(hits)) as server:
        yield PlainUpstream(server.port, hits)


@pytest.fixture
def upstream(plain_server: PlainUpstream) -> PlainUpstream:
    plain_server.hits.clear()
    return plain_server


class AcceptRecorder:
    """A raw TCP listener on 127.0.0.1 recording, in order, the peer port of every accepted connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._send, self._receive = anyio.create_memory_object_stream[int](100)

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        await self._send.send(stream.extra(anyio.abc.SocketAttribute.remote_port))
        await stream.aclose()

    async def assert_no_earlier_connection(self) -> None:
        """Connect once more and require that to be the first connection ever accepted (the accept
        queue is FIFO, so any connection the guard had let through would have come first)."""
        async with await anyio.connect_tcp("127.0.0.1", self.port) as control:
            with anyio.fail_after(5):
                first = await self._receive.receive()
            assert first == control.extra(anyio.abc.SocketAttribute.local_port)


@asynccontextmanager
async def accept_recorder() -> AsyncIterator[AcceptRecorder]:
    async with (
        await anyio.create_tcp_listener(local_host="127.0.0.1") as listener,
        anyio.create_task_group() as tg,
    ):
        recorder = AcceptRecorder(listener.extra(anyio.abc.SocketAttribute.local_port))
        tg.start_soon(listener.serve, recorder.handle)
        yield recorder
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_guarded_get_to_allowed_loopback(upstream: PlainUpstream) -> None:
    with anyio.fail_after(10):
        async with guarded_http_client(LOOPBACK) as client:
            resp = await client.get(upstream.url("/hello"))
            assert (resp.status_code, resp.text) == (200, "hi")
            resp = await client.get(upstream.url("/hello", host="localhost"))
            assert resp.status_code == 200
    assert upstream.hits["hello"] == 2


@pytest.mark.anyio
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "rebound.test"])
async def test_guarded_client_refuses_before_connecting(host: str) -> None:
    resolver = fixed_resolver({"localhost": ["127.0.0.1"], "rebound.test": ["127.0.0.1"]})
    with anyio.fail_after(10):
        async with accept_recorder() as recorder, guarded_http_client(NOTHING, resolver=resolver) as client:
            with pytest.raises(EndpointForbidden) as info:
                await client.get(f"http://{host}:{recorder.port}/")
            assert "loopback address" in info.value.message
            await recorder.assert_no_earlier_connection()


@pytest.mark.anyio
async def test_system_resolved_localhost_is_refused(upstream: PlainUpstream) -> None:
    with anyio.fail_after(10):
        async with guarded_http_client(NOTHING) as client:
            with pytest.raises(EndpointForbidden):
                await client.get(upstream.url("/hello", host="localhost"))
    assert upstream.hits["hello"] == 0


@pytest.mark.anyio
async def test_dns_rebinding_after_validation_is_caught_at_connect_time() -> None:
    answers = {"rebind.test": ["8.8.8.8"]}
    resolver = fixed_resolver(answers)
    async with accept_recorder() as recorder:
        url = f"http://rebind.test:{recorder.port}/mcp"
        await validate_endpoint_url(url, NOTHING, resolver=resolver)
        answers["rebind.test"] = ["127.0.0.1"]  # the attacker's DNS changes its answer
        with anyio.fail_after(10):
            async with guarded_http_client(NOTHING, resolver=resolver) as client:
                with pytest.raises(EndpointForbidden):
                    await client.get(url)
            await recorder.assert_no_earlier_connection()


@pytest.mark.anyio
async def test_connects_to_the_checked_address_keeping_the_host_header(upstream: PlainUpstream) -> None:
    # 127.0.0.2 has no listener: the guard moves on to the next checked address.
    resolver = fixed_resolver({"upstream.test": ["127.0.0.2", "127.0.0.1"]})
    with anyio.fail_after(10):
        async with guarded_http_client(LOOPBACK, resolver=resolver) as client:
            resp = await client.get(upstream.url("/host", host="upstream.test"))
    assert resp.text == f"upstream.test:{upstream.port}"


@pytest.mark.anyio
async def test_unresolvable_host_fails_at_connect_time() -> None:
    with anyio.fail_after(10):
        async with guarded_http_client(LOOPBACK, resolver=fixed_resolver({})) as client:
            with pytest.raises(HostResolutionError):
                await client.get("http://nowhere.test/")


@pytest.mark.anyio
async def test_slow_resolution_is_a_connect_timeout() -> None:
    async def hanging(host: str, port: int) -> list[IPAddress]:
        await anyio.sleep_forever()
        raise AssertionError

    with anyio.fail_after(10):
        async with guarded_http_client(LOOPBACK, resolver=hanging, timeout=httpx2.Timeout(0.2)) as client:
            with pytest.raises(httpx2.ConnectTimeout):
                await client.get("http://slow.test/")


@pytest.mark.anyio
@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_redirects_are_never_followed(upstream: PlainUpstream, code: int, method: str) -> None:
    with anyio.fail_after(10):
        async with guarded_http_client(LOOPBACK) as client:
            with pytest.raises(RedirectRefused) as info:
                await client.request(method, upstream.url(f"/redirect/{code}"), follow_redirects=True)
    assert f"upstream answered {code} to http://127.0.0.1:{upstream.port}/target;" in str(info.value)
    assert "secret" not in str(info.value)
    assert info.value.request.url.path == f"/redirect/{code}"
    assert (upstream.hits["redirect"], upstream.hits["/target"]) == (1, 0)


# --- TLS: the connection goes to the checked IP, SNI and certificate use the hostname ------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "upstream.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("upstream.test")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return folder / "cert.pem", folder / "key.pem"


@contextmanager
def tls_server(tls_files: tuple[Path, Path]) -> Iterator[PlainUpstream]:
    hits: Counter[str] = Counter()
    certfile, keyfile = tls_files
    with ThreadedServer(plain_app(hits), ssl_certfile=str(certfile), ssl_keyfile=str(keyfile)) as server:
        yield PlainUpstream(server.port, hits)


@pytest.mark.anyio
async def test_tls_verifies_the_hostname_not_the_address(tls_files: tuple[Path, Path]) -> None:
    trust = ssl.create_default_context(cafile=str(tls_files[0]))
    resolver = fixed_resolver({"upstream.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    with tls_server(tls_files) as upstream, anyio.fail_after(10):
        async with guarded_http_client(LOOPBACK, resolver=resolver, verify=trust) as client:
            resp = await client.get(upstream.url("/hello", host="upstream.test", scheme="https"))
            assert resp.text == "hi"
            with pytest.raises(httpx2.ConnectError, match=r"(?i)certificate"):
                await client.get(upstream.url("/hello", host="other.test", scheme="https"))
        assert upstream.hits["hello"] == 1


# --- through the MCP SDK ----------------------------------------------------------------------------------


def leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


async def initialize_streamable(url: str, client: httpx2.AsyncClient) -> BaseException | None:
    """Run `initialize` over Streamable HTTP; the failure it ended with, or None."""
    try:
        with anyio.fail_after(15):
            async with (
                client,
                streamable_http_client(url, http_client=client) as (read, write),
                ClientSession(read, write, read_timeout_seconds=5) as session,
            ):
                await session.initialize()
    except Exception as exc:
        return exc
    return None


@pytest.mark.anyio
async def test_sdk_follows_same_origin_redirect_with_its_own_client(upstream: PlainUpstream) -> None:
    """The control for the test below: left alone, the SDK follows a same-origin 307."""
    await initialize_streamable(upstream.url("/mcp"), create_mcp_http_client())
    assert upstream.hits["/real-mcp"] >= 1


@pytest.mark.anyio
async def test_sdk_streamable_http_redirect_is_not_followed(upstream: PlainUpstream) -> None:
    failure = await initialize_streamable(upstream.url("/mcp"), guarded_http_client(LOOPBACK))
    assert failure is not None
    assert any(isinstance(leaf, RedirectRefused) for leaf in leaves(failure)), failure
    assert upstream.hits["mcp"] >= 1
    assert upstream.hits["/real-mcp"] == 0


@pytest.mark.anyio
async def test_sdk_sse_redirect_is_not_followed(upstream: PlainUpstream) -> None:
    failure: BaseException | None = None
    try:
        with anyio.fail_after(15):
            async with sse_client(upstream.url("/mcp"), httpx_client_factory=sse_client_factory(LOOPBACK)):
                pass
    except Exception as exc:
        failure = exc
    assert failure is not None
    assert any(isinstance(leaf, RedirectRefused) for leaf in leaves(failure)), failure
    assert upstream.hits["/real-mcp"] == 0


@pytest.fixture(scope="module")
def mcp_upstream() -> Iterator[PlainUpstream]:
    server = MCPServer("echo-upstream")

    @server.tool()
    def echo(text: str) -> str:
        """Echo the text back."""
        return text

    with ThreadedServer(server.streamable_http_app()) as running:
        yield PlainUpstream(running.port)


@pytest.mark.anyio
async def test_sdk_session_through_the_guard(mcp_upstream: PlainUpstream) -> None:
    with anyio.fail_after(15):
        async with (
            guarded_http_client(LOOPBACK) as client,
            streamable_http_client(mcp_upstream.url("/mcp"), http_client=client) as (read, write),
            ClientSession(read, write, read_timeout_seconds=5) as session,
        ):
            await session.initialize()
            tools = await session.list_tools()
    assert [tool.name for tool in tools.tools] == ["echo"]


@pytest.mark.anyio
async def test_sdk_session_refused_when_loopback_is_not_allowed(mcp_upstream: PlainUpstream) -> None:
    failure = await initialize_streamable(mcp_upstream.url("/mcp"), guarded_http_client(NOTHING))
    assert failure is not None
    assert any(isinstance(leaf, EndpointForbidden) for leaf in leaves(failure)), failure
