"""Handshake-era MCP sessions across replicas (issue 13 item 5, SPEC section 10): three ScaiLink apps,
each a real uvicorn on 127.0.0.1, on one SQLite file and the real Redis, a real upstream MCP server,
and one real SDK client whose every HTTP request goes to the next replica in turn (round robin, no
stickiness: the initialize on one, the GET stream and each POST wherever they fall).

Skipped only when no Redis answers on 127.0.0.1:6379 and SCAILINK_TEST_REQUIRE_REDIS is unset."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import httpx2
import mcp_types as types
import pytest
from mcp.client.session import ClientSession, IncomingMessage
from mcp.client.streamable_http import streamable_http_client

from scailink_mcp.config import Settings
from scailink_mcp.mcp_sessions import SessionStore
from tests.conftest import LiveApp, TokenFactory, auth_headers
from tests.test_mcp_gateway import list_all_tools
from tests.test_replicas_events import eventually, redis_reason, redis_settings, register, until
from tests.upstream import UpstreamServer

__all__ = ["redis_reason", "redis_settings"]  # fixtures used here, defined with the events tests

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


class RoundRobin(httpx2.AsyncBaseTransport):
    """Sends each request to the next port in turn (what a load balancer without stickiness does)."""

    def __init__(self, ports: list[int]) -> None:
        self.inner = httpx2.AsyncHTTPTransport()
        self.ports = itertools.cycle(ports)
        self.hits: Counter[tuple[str, int]] = Counter()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        port = next(self.ports)
        request.url = request.url.copy_with(port=port)
        self.hits[(request.method, port)] += 1
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer() as server:
        yield server


@asynccontextmanager
async def replicas(settings: Settings, count: int = 3) -> AsyncIterator[list[LiveApp]]:
    with ExitStack() as stack:
        lives = [stack.enter_context(LiveApp(settings)) for _ in range(count)]
        await until(
            lambda: all(
                live.parts.mcp_sessions and live.parts.mcp_sessions.health() == "ok" for live in lives
            )
        )
        yield lives


def store(live: LiveApp) -> SessionStore:
    sessions = live.parts.mcp_sessions
    assert sessions is not None
    return sessions


def port_of(live: LiveApp) -> int:
    port = urlsplit(live.base_url).port
    assert port is not None
    return port


@asynccontextmanager
async def spread_client(
    lives: list[LiveApp], tok: str, on_message: Any = None
) -> AsyncIterator[tuple[ClientSession, RoundRobin, list[str]]]:
    transport = RoundRobin([port_of(live) for live in lives])
    session_ids: list[str] = []

    async def remember(response: httpx2.Response) -> None:
        sid = response.headers.get("mcp-session-id")
        if sid and sid not in session_ids:
            session_ids.append(sid)

    async with (
        httpx2.AsyncClient(
            headers=auth_headers(tok),
            timeout=httpx2.Timeout(30, read=60),
            transport=transport,
            event_hooks={"response": [remember]},
        ) as http,
        streamable_http_client(lives[0].mcp_url, http_client=http) as (read, write),
        ClientSession(read, write, message_handler=on_message) as session,
    ):
        await session.initialize()
        yield session, transport, session_ids


async def raw_post(live: LiveApp, tok: str, session_id: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as c:
        return await c.post(
            live.mcp_url,
            json={"jsonrpc": "2.0", "id": 7, "method": "tools/list", "params": {}},
            headers={
                **auth_headers(tok),
                "mcp-session-id": session_id,
                "accept": "application/json, text/event-stream",
                "mcp-protocol-version": "2025-11-25",
            },
        )


async def test_one_session_spread_over_three_replicas(
    redis_settings: Callable[..., Settings], token: TokenFactory, upstream: UpstreamServer
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    changed: list[str] = []

    async def on_message(message: IncomingMessage) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changed.append("tools")

    # A replica's copy idle for `mcp_park_idle_s` is parked (session_park.py) and the count of copies
    # below would then depend on the machine's speed: parking is kept out of this test's way.
    async with replicas(redis_settings(mcp_park_idle_s=60)) as lives:
        a, b, _ = lives
        server = await register(a, tok, name="spread", endpoint_url=upstream.url)
        echo = f"remote.u1.{server['slug']}.echo"
        async with spread_client(lives, tok, on_message) as (session, transport, session_ids):
            assert len(session_ids) == 1
            for i in range(9):  # requests land on A, B and C in turn; every one succeeds
                if i % 3 == 0:
                    assert echo in {t.name for t in await list_all_tools(session)}
                result = await session.call_tool(echo, {"text": f"call {i}"})
                assert not result.is_error, result
            posts = {port for (method, port) in transport.hits if method == "POST"}
            assert posts == {port_of(x) for x in lives}, transport.hits
            revived = sum(
                1
                for live in lives
                if session_ids[0] in live.parts.mcp_sessions._managers["aggregate"]._server_instances
            )  # type: ignore[union-attr]
            assert revived == 3, "the session is served by each replica"

            # Another principal presenting the id gets 404 on every replica.
            other = token("u2", "t1", ("tenant_user",))
            for live in lives:
                assert (await raw_post(live, other, session_ids[0])).status_code == 404

            # A registration on B reaches this client's GET stream, wherever it was opened.
            await register(b, tok, name="spread-two", endpoint_url=upstream.url)
            await until(lambda: changed, timeout=2.0)
        # The client closed the session (DELETE on one replica): it is gone on all three.

        async def ended_everywhere() -> bool:
            return [(await raw_post(live, tok, session_ids[0])).status_code for live in lives] == [404] * 3

        await eventually(ended_everywhere, timeout=2.0)


async def test_unknown_session_id_is_404_everywhere(
    redis_settings: Callable[..., Settings], token: TokenFactory
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    async with replicas(redis_settings(), count=2) as lives:
        for live in lives:
            assert (await raw_post(live, tok, "0" * 32)).status_code == 404


async def test_session_survives_the_replica_that_created_it(
    redis_settings: Callable[..., Settings], token: TokenFactory, upstream: UpstreamServer
) -> None:
    """The replica that served the initialize stops; the session goes on on the others."""
    tok = token("u1", "t1", ("tenant_user",))
    settings = redis_settings()
    with ExitStack() as on_a:
        a = on_a.enter_context(LiveApp(settings))
        async with replicas(settings, count=2) as (b, c):
            server = await register(b, tok, name="survivor", endpoint_url=upstream.url)
            echo = f"remote.u1.{server['slug']}.echo"
            async with spread_client([a, b, c], tok) as (session, transport, _ids):
                transport.ports = itertools.cycle([port_of(b), port_of(c)])  # A is taken out of rotation
                on_a.close()
                with anyio.fail_after(20):
                    result = await session.call_tool(echo, {"text": "after A"})
                assert not result.is_error


def test_touch_times_refresh_once_per_period_and_forget_sessions_that_went_quiet() -> None:
    """The replica layer refreshes a held session's Redis key at most once per period, and its table
    of refresh times does not grow with every session ever seen (sessions that expire or end on
    another replica are never DELETEd here)."""
    from scailink_mcp.mcp_sessions import TouchTimes

    times = TouchTimes(every_s=30.0, sweep_at=8)
    assert times.due("s1", 0.0), "a session never refreshed is due at once, whatever the clock"
    assert not times.due("s1", 29.9) and times.due("s1", 30.0)
    for i in range(100):  # one new session per second, each seen once
        times.mark(f"old-{i}", 100.0 + i)
    assert len(times) <= 2 * 30 + 8, len(times)  # only the last period's sessions (and slack) remain
    assert times.due("old-0", 200.0), "a dropped entry is simply due again"
    times.forget("old-99")
    assert times.due("old-99", 199.5)
