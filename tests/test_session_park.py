"""Parking idle handshake-era MCP sessions (issue 14, `session_park.py`): a real ScaiLink (uvicorn on
127.0.0.1), a real upstream MCP server, and raw HTTP clients (an SDK client keeps a GET stream open, so
its session is never parked; that case has its own test).

Observable: the session table (the SDK's manager) no longer holds a parked session, the store holds its
record, and the `scailink_mcp_sessions_parked` / `scailink_mcp_parkings` gauges count it."""

from __future__ import annotations

import gc
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import mcp_types as types
import pytest
from mcp.client.session import IncomingMessage

from scailink_mcp.config import Settings
from scailink_mcp.session_park import LocalSessions
from tests.conftest import LiveApp, TokenFactory, auth_headers, start_app
from tests.test_mcp_gateway import mcp_client, register, upstream, wait_for
from tests.test_replicas_events import redis_reason, redis_settings
from tests.test_replicas_sessions import replicas
from tests.upstream import UpstreamServer

__all__ = ["redis_reason", "redis_settings", "upstream"]  # fixtures used here, defined elsewhere

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

PARK_S = 0.3
ACCEPT = "application/json, text/event-stream"


@asynccontextmanager
async def live_app(settings: Settings) -> AsyncIterator[LiveApp]:
    with LiveApp(settings) as app:
        yield app


def answer(response: httpx.Response) -> dict[str, Any]:
    """The JSON-RPC answer of a POST (a JSON body, or the `data:` of an SSE stream)."""
    assert response.status_code == 200, response.text
    if response.headers["content-type"].startswith("application/json"):
        message: dict[str, Any] = response.json()
        return message
    for line in response.text.splitlines():
        if line.startswith("data:") and '"id"' in line:
            message = json.loads(line[5:])
            return message
    raise AssertionError(f"no answer in {response.text!r}")


class Raw:
    """A handshake-era session driven by hand (no GET stream unless asked)."""

    def __init__(self, http: httpx.AsyncClient, url: str, tok: str) -> None:
        self.http, self.url = http, url
        self.headers = {**auth_headers(tok), "accept": ACCEPT, "content-type": "application/json"}
        self.ids = 0
        self.session_id = ""

    async def open(self) -> str:
        params = {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        }
        response = await self.http.post(
            self.url, headers=self.headers, content=self._body("initialize", params)
        )
        assert answer(response)["result"]["protocolVersion"] == "2025-11-25"
        self.session_id = response.headers["mcp-session-id"]
        self.headers |= {"mcp-session-id": self.session_id, "mcp-protocol-version": "2025-11-25"}
        assert (await self.notify("notifications/initialized")).status_code == 202
        return self.session_id

    def _body(self, method: str, params: dict[str, Any]) -> str:
        self.ids += 1
        return json.dumps({"jsonrpc": "2.0", "id": self.ids, "method": method, "params": params})

    async def post(self, method: str, params: dict[str, Any], headers: Any = None) -> httpx.Response:
        body = self._body(method, params)
        return await self.http.post(self.url, headers=headers or self.headers, content=body)

    async def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        message = answer(await self.post(method, params))
        assert "result" in message, message
        result: dict[str, Any] = message["result"]
        return result

    async def notify(self, method: str) -> httpx.Response:
        body = json.dumps({"jsonrpc": "2.0", "method": method})
        return await self.http.post(self.url, headers=self.headers, content=body)


def holds(live: LiveApp, session_id: str, endpoint: str = "aggregate") -> bool:
    return live.parts.parking.tables[endpoint].holds(session_id)


def parked(live: LiveApp) -> int:
    store = live.parts.parking.store
    assert isinstance(store, LocalSessions)
    return len(store)


async def gauge(live: LiveApp, name: str) -> float:
    async with httpx.AsyncClient(base_url=live.base_url) as c:
        text = (await c.get("/metrics")).text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


async def until_parked(live: LiveApp, session_id: str, endpoint: str = "aggregate") -> None:
    await wait_for(lambda: not holds(live, session_id, endpoint), timeout=5.0)


async def parking_round_passed(live: LiveApp, http: httpx.AsyncClient, tok: str) -> None:
    """Wait until a parking round has parked a session opened now (so every session idle as long
    was considered too), then end that session: what a test of "not parked" waits on, not a sleep."""
    table, witness = live.parts.parking.tables["aggregate"], Raw(http, live.mcp_url, tok)
    tracked = len(table)
    await until_parked(live, await witness.open())
    assert (await http.delete(live.mcp_url, headers=witness.headers)).status_code == 200
    assert parked(live) == 0
    await wait_for(lambda: len(table) == tracked, timeout=5.0)  # its ended copy's task is done


async def test_a_parked_session_behaves_as_an_unparked_one(
    settings_factory: Callable[..., Settings], token: TokenFactory, upstream: UpstreamServer
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    async with (
        live_app(settings_factory(mcp_park_idle_s=PARK_S)) as live,
        httpx.AsyncClient(timeout=30) as http,
    ):
        server = await register(live, tok, name="parked", endpoint_url=upstream.url)
        echo = f"remote.u1.{server['slug']}.echo"
        raw = Raw(http, live.mcp_url, tok)
        sid = await raw.open()
        assert holds(live, sid)

        await until_parked(live, sid)
        assert parked(live) == 1
        gc.collect()  # the SDK's machinery is gone: nothing holds the session's connection any more
        await wait_for(lambda: live.parts.notifier.session_count() == 0)
        assert len(live.parts.parking.tables["aggregate"]) == 0
        assert await gauge(live, "scailink_mcp_sessions_parked") == 1
        assert await gauge(live, "scailink_mcp_parkings") >= 1
        assert echo in {t["name"] for t in (await raw.call("tools/list", {}))["tools"]}
        assert holds(live, sid) and parked(live) == 0  # revived by the request

        await until_parked(live, sid)
        result = await raw.call("tools/call", {"name": echo, "arguments": {"text": "after parking"}})
        assert result["content"][0]["text"] == "after parking"

        await until_parked(live, sid)
        assert (await raw.notify("notifications/roots/list_changed")).status_code == 202
        assert holds(live, sid)

        # A GET stream holds the session: not parked while it is open; list_changed reaches it.
        await until_parked(live, sid)
        async with http.stream("GET", live.mcp_url, headers=raw.headers) as stream:
            assert stream.status_code == 200
            await parking_round_passed(live, http, tok)  # a round that parks an idle session ran
            assert holds(live, sid) and parked(live) == 0
            await register(live, tok, name="parked-two", endpoint_url=upstream.url)
            with anyio.fail_after(10):
                async for line in stream.aiter_lines():
                    if line.startswith("data:") and "notifications/tools/list_changed" in line:
                        break

        # DELETE on a parked session ends it; it stays gone.
        await until_parked(live, sid)
        deleted = await http.delete(live.mcp_url, headers=raw.headers)
        assert deleted.status_code == 200, deleted.text
        assert (await raw.post("tools/list", {})).status_code == 404
        assert not holds(live, sid) and parked(live) == 0


async def test_another_principal_gets_404_and_the_session_stays_revivable(
    settings_factory: Callable[..., Settings], token: TokenFactory
) -> None:
    tok, other = token("u1", "t1", ("tenant_user",)), token("u2", "t1", ("tenant_user",))
    async with (
        live_app(settings_factory(mcp_park_idle_s=PARK_S)) as live,
        httpx.AsyncClient(timeout=30) as http,
    ):
        raw = Raw(http, live.mcp_url, tok)
        sid = await raw.open()
        await until_parked(live, sid)
        stolen = {**raw.headers, **auth_headers(other)}
        refused = await raw.post("tools/list", {}, headers=stolen)
        assert refused.status_code == 404 and refused.json()["error"]["message"] == "Session not found"
        assert not holds(live, sid) and parked(live) == 1
        assert (
            await http.get(live.mcp_url, headers={**stolen, "accept": "text/event-stream"})
        ).status_code == 404
        assert (await http.delete(live.mcp_url, headers=stolen)).status_code == 404
        assert (await raw.call("tools/list", {}))["tools"] == []
        # An id never issued: the same 404 as before parking existed.
        unknown = {**raw.headers, "mcp-session-id": "0" * 32}
        assert (await raw.post("tools/list", {}, headers=unknown)).status_code == 404


async def test_a_parked_session_expires_when_the_sdk_would_have_expired_it(
    settings_factory: Callable[..., Settings], token: TokenFactory
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    settings = settings_factory(mcp_park_idle_s=0.2, mcp_session_idle_s=1.5)
    async with live_app(settings) as live, httpx.AsyncClient(timeout=30) as http:
        raw = Raw(http, live.mcp_url, tok)
        sid = await raw.open()
        await until_parked(live, sid)
        assert (await raw.call("tools/list", {}))["tools"] == []  # revived: the idle clock restarts
        await until_parked(live, sid)
        # Expired records go with the next round (a request now would revive it, so none is sent).
        await wait_for(lambda: parked(live) == 0, timeout=5.0)
        assert (await raw.post("tools/list", {})).status_code == 404
        assert parked(live) == 0


async def test_parking_disabled_with_0(
    settings_factory: Callable[..., Settings], token: TokenFactory
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    async with live_app(settings_factory(mcp_park_idle_s=0)) as live, httpx.AsyncClient(timeout=30) as http:
        raw = Raw(http, live.mcp_url, tok)
        sid = await raw.open()
        await anyio.sleep(1.0)
        assert holds(live, sid) and parked(live) == 0
        assert await gauge(live, "scailink_mcp_parkings") == 0


async def test_the_per_principal_cap_counts_parked_sessions(
    settings_factory: Callable[..., Settings], token: TokenFactory
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    settings = settings_factory(mcp_park_idle_s=PARK_S, mcp_max_sessions_per_principal=2)
    async with live_app(settings) as live, httpx.AsyncClient(timeout=30) as http:
        first, second, third = (Raw(http, live.mcp_url, tok) for _ in range(3))
        oldest = await first.open()
        await until_parked(live, oldest)
        await until_parked(live, await second.open())
        assert parked(live) == 2
        await third.open()  # one more than the cap: the oldest (parked) session is closed
        assert (await first.post("tools/list", {})).status_code == 404
        assert (await second.call("tools/list", {}))["tools"] == []
        assert (await third.call("tools/list", {}))["tools"] == []


async def test_an_sdk_client_with_its_get_stream_is_never_parked(
    settings_factory: Callable[..., Settings], token: TokenFactory, upstream: UpstreamServer
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    changed = anyio.Event()

    async def on_message(message: IncomingMessage) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changed.set()

    async with (
        live_app(settings_factory(mcp_park_idle_s=PARK_S)) as live,
        mcp_client(live.mcp_url, tok, on_message=on_message) as session,
        httpx.AsyncClient(timeout=30) as http,
    ):
        await parking_round_passed(live, http, tok)
        assert len(live.parts.parking.tables["aggregate"]) == 1
        assert await gauge(live, "scailink_mcp_parkings") == 1  # the witness only
        server = await register(live, tok, name="streamed", endpoint_url=upstream.url)
        with anyio.fail_after(10):
            await changed.wait()
        result = await session.call_tool(f"remote.u1.{server['slug']}.echo", {"text": "hi"})
        assert not result.is_error


async def test_the_per_server_endpoint_parks_and_revives(
    settings_factory: Callable[..., Settings], token: TokenFactory, upstream: UpstreamServer
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    async with (
        live_app(settings_factory(mcp_park_idle_s=PARK_S)) as live,
        httpx.AsyncClient(timeout=30) as http,
    ):
        server = await register(live, tok, name="single", endpoint_url=upstream.url)
        url = f"{live.base_url}/v1/modules/scailink/remote-servers/{server['id']}/mcp"
        raw = Raw(http, url, tok)
        sid = await raw.open()
        await until_parked(live, sid, "single")
        result = await raw.call("tools/call", {"name": "echo", "arguments": {"text": "single"}})
        assert result["content"][0]["text"] == "single"
        assert holds(live, sid, "single")


async def test_with_redis_a_parked_session_is_revived_from_its_key(
    redis_settings: Callable[..., Settings], token: TokenFactory
) -> None:
    """With Redis the record is the session's key: parking ends this replica's copy only; the next
    request revives it (on any replica) as one created elsewhere; DELETE still ends it everywhere."""
    tok, other = token("u1", "t1", ("tenant_user",)), token("u2", "t1", ("tenant_user",))
    settings = redis_settings(mcp_park_idle_s=PARK_S)
    async with replicas(settings, count=2) as (a, b), httpx.AsyncClient(timeout=30) as http:
        raw = Raw(http, a.mcp_url, tok)
        sid = await raw.open()
        await until_parked(a, sid)
        assert await gauge(a, "scailink_mcp_parkings") >= 1
        stolen = {**raw.headers, **auth_headers(other)}
        assert (await raw.post("tools/list", {}, headers=stolen)).status_code == 404
        assert (await raw.call("tools/list", {}))["tools"] == []
        assert holds(a, sid)
        await until_parked(a, sid)
        assert (await http.delete(a.mcp_url, headers=raw.headers)).status_code == 200
        on_b = Raw(http, b.mcp_url, tok)
        on_b.headers = raw.headers
        assert (await on_b.post("tools/list", {})).status_code == 404
        assert (await raw.post("tools/list", {})).status_code == 404


async def test_mcp_max_sessions_counts_parked_sessions(
    settings_factory: Callable[..., Settings], token: TokenFactory
) -> None:
    """Held and parked sessions together are at most `mcp_max_sessions`: the next `initialize` gets the
    SDK's own 503 (compared with the SDK's answer when nothing is parked)."""
    toks = [token(f"u{i}", "t1", ("tenant_user",)) for i in range(3)]
    refusals = []
    for park in (0.0, PARK_S):
        settings = settings_factory(mcp_park_idle_s=park, mcp_max_sessions=2)
        async with live_app(settings) as live, httpx.AsyncClient(timeout=30) as http:
            first, second = Raw(http, live.mcp_url, toks[0]), Raw(http, live.mcp_url, toks[1])
            await first.open()
            await second.open()
            if park:
                await until_parked(live, first.session_id)
                await until_parked(live, second.session_id)
            init = {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "1"},
            }
            third = Raw(http, live.mcp_url, toks[2])
            refused = await third.post("initialize", init)
            assert refused.status_code == 503
            refusals.append((refused.headers["content-type"], refused.content))
            if park:  # a session ended makes room again
                assert (await http.delete(live.mcp_url, headers=first.headers)).status_code == 200
                assert await third.open()
    assert refusals[0] == refusals[1]


async def test_a_request_racing_the_parking_finds_its_session_revived_for_good(
    settings_factory: Callable[..., Settings], token: TokenFactory
) -> None:
    """In-process (one event loop, so the request lands while the parked session's SDK task is still
    winding down): the revived copy must not be forgotten when the old copy's task ends."""
    tok = token("u1", "t1", ("tenant_user",))
    settings = settings_factory(mcp_park_idle_s=0, mcp_allowed_hosts=["scailink.test"])
    async with start_app(settings) as app:  # no parking loop: the rounds by hand
        raw = Raw(app.client, "/mcp", tok)
        sid = await raw.open()
        parking = app.parts.parking
        for _ in range(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(parking.round)
                await anyio.lowlevel.checkpoint()
                assert not parking.tables["aggregate"].holds(sid)  # popped, its task not done yet
                assert (await raw.call("tools/list", {}))["tools"] == []
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            assert parking.tables["aggregate"].holds(sid)
            assert (await raw.call("tools/list", {}))["tools"] == []
        assert parking.parked == 5
