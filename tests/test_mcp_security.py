"""Issue 11 on the MCP surface, against a real ScaiLink on 127.0.0.1 (uvicorn) with raw HTTP clients:
sessions belong to (tenant, user), one principal cannot exhaust the session table, `/mcp` shares the
REST rate limit and body cap, malformed JSON-RPC ids and deep nesting are refused, idle sessions close,
and a JWT's dates must be numbers."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from scailink_mcp.config import Settings
from tests.conftest import LiveApp, TokenFactory, auth_headers

pytestmark = pytest.mark.anyio

MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"},
    },
}


def session_headers(tok: str, sid: str) -> dict[str, str]:
    return {**MCP_HEADERS, **auth_headers(tok), "mcp-session-id": sid, "mcp-protocol-version": "2025-06-18"}


async def open_session(c: httpx.AsyncClient, tok: str, path: str = "/mcp") -> str:
    resp = await c.post(path, json=INIT, headers={**MCP_HEADERS, **auth_headers(tok)})
    assert resp.status_code == 200, resp.text
    sid = resp.headers["mcp-session-id"]
    note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    headers = session_headers(tok, sid)
    assert (await c.post(path, json=note, headers=headers)).status_code == 202
    return sid


async def ping(c: httpx.AsyncClient, tok: str, sid: str, path: str = "/mcp") -> httpx.Response:
    headers = session_headers(tok, sid)
    return await c.post(path, json={"jsonrpc": "2.0", "id": 7, "method": "ping"}, headers=headers)


@pytest.fixture
def live_with(settings_factory: Callable[..., Settings]) -> Iterator[Callable[..., LiveApp]]:
    apps: list[LiveApp] = []

    def start(**overrides: Any) -> LiveApp:
        app = LiveApp(settings_factory(**overrides)).__enter__()
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.__exit__(None, None, None)


async def test_a_session_of_u1_in_tenant_a_is_unknown_to_u1_in_tenant_b(
    live: LiveApp, token: TokenFactory
) -> None:
    tok_a, tok_b = token("u1", "tenant-a"), token("u1", "tenant-b")
    async with httpx.AsyncClient(base_url=live.base_url, timeout=10) as c:
        sid = await open_session(c, tok_a)
        assert (await ping(c, tok_a, sid)).status_code == 200
        refused = await ping(c, tok_b, sid)
        assert refused.status_code == 404, refused.text
        assert (await ping(c, tok_a, sid)).status_code == 200


async def test_legacy_sse_session_of_another_tenant_is_refused(live: LiveApp, token: TokenFactory) -> None:
    tok_a, tok_b = token("u1", "tenant-a"), token("u1", "tenant-b")
    async with (
        httpx.AsyncClient(base_url=live.base_url, timeout=10) as c,
        c.stream("GET", "/sse", headers=auth_headers(tok_a)) as stream,
    ):
        lines = stream.aiter_lines()  # kept open: leaving an `async for` early would close the stream
        endpoint = ""
        while not endpoint.startswith("data:"):
            endpoint = await lines.__anext__()
        endpoint = endpoint[5:].strip()
        assert "session_id=" in endpoint
        forged = await c.post(endpoint, json=INIT, headers=auth_headers(tok_b))
        assert forged.status_code in (403, 404), forged.text
        own = await c.post(endpoint, json=INIT, headers=auth_headers(tok_a))
        assert own.status_code == 202, own.text


async def test_opening_more_sessions_than_the_cap_closes_that_principals_oldest(
    live_with: Callable[..., LiveApp], token: TokenFactory
) -> None:
    live = live_with(mcp_max_sessions_per_principal=3, mcp_max_sessions=5)
    flood, other = token("viewer", "t1", groups=("tenant_viewer",)), token("u2", "t2")
    async with httpx.AsyncClient(base_url=live.base_url, timeout=10) as c:
        victim = await open_session(c, other)
        sids = [await open_session(c, flood) for _ in range(20)]
        assert (await ping(c, flood, sids[0])).status_code == 404, "the oldest was closed"
        for sid in sids[-3:]:
            assert (await ping(c, flood, sid)).status_code == 200
        # The other tenant's session survived, and that tenant can still open new ones.
        assert (await ping(c, other, victim)).status_code == 200
        assert (await ping(c, other, await open_session(c, other))).status_code == 200


async def test_mcp_is_under_the_per_user_rate_limit(
    live_with: Callable[..., LiveApp], token: TokenFactory
) -> None:
    live = live_with(rate_limit_per_s=1.0, rate_limit_burst=5)
    tok = token("u1", "t1")
    async with httpx.AsyncClient(base_url=live.base_url, timeout=10) as c:
        sid = await open_session(c, tok)  # two requests
        statuses = [(await ping(c, tok, sid)).status_code for _ in range(10)]
        assert statuses.count(429) >= 5, statuses
        limited = await ping(c, tok, sid)
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1
        assert limited.json()["error"]["code"] == -32600
        # REST shares the bucket: the same user is limited there too, another user is not.
        rest = await c.get("/v1/modules/scailink/sessions", headers=auth_headers(tok))
        assert rest.status_code == 429
        other = await c.get("/v1/modules/scailink/sessions", headers=auth_headers(token("u2", "t1")))
        assert other.status_code == 200


async def test_mcp_body_over_one_mib_is_413(live: LiveApp, token: TokenFactory) -> None:
    tok = token()
    big = {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"pad": "x" * (1024 * 1024)}}
    async with httpx.AsyncClient(base_url=live.base_url, timeout=10) as c:
        resp = await c.post("/mcp", content=json.dumps(big), headers={**MCP_HEADERS, **auth_headers(tok)})
        assert resp.status_code == 413
        assert resp.json()["error"]["message"] == "request body too large"

        async def chunks() -> Any:  # no Content-Length: counted while reading
            for _ in range(40):
                yield b" " * 32768
            yield json.dumps(INIT).encode()

        resp = await c.post("/mcp", content=chunks(), headers={**MCP_HEADERS, **auth_headers(tok)})
        assert resp.status_code == 413


@pytest.mark.parametrize("bad_id", [None, {"a": 1}, [1], True])
async def test_mcp_message_with_a_null_or_object_id_is_invalid(
    live: LiveApp, token: TokenFactory, bad_id: Any
) -> None:
    tok = token()
    async with httpx.AsyncClient(base_url=live.base_url, timeout=10) as c:
        sid = await open_session(c, tok)
        headers = session_headers(tok, sid)
        resp = await c.post("/mcp", json={"jsonrpc": "2.0", "id": bad_id, "method": "ping"}, headers=headers)
        assert resp.status_code == 400, resp.text
        assert resp.json() == {
            "jsonrpc": "2.0",
            "id": None,
            "error": {"code": -32600, "message": "Invalid Request: id must be a string or an integer"},
        }
        assert (await ping(c, tok, sid)).status_code == 200


async def test_mcp_deep_nesting_is_a_parse_error(live: LiveApp, token: TokenFactory) -> None:
    tok = token()
    body = '{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"x": ' + "[" * 990 + "]" * 990 + "}}"
    async with httpx.AsyncClient(base_url=live.base_url, timeout=10) as c:
        resp = await c.post("/mcp", content=body, headers={**MCP_HEADERS, **auth_headers(tok)})
        assert resp.status_code == 400
        assert resp.json()["error"]["code"] == -32700
        assert "nested deeper" in resp.json()["error"]["message"]
        # The connection stays usable.
        again = await c.post("/mcp", json=INIT, headers={**MCP_HEADERS, **auth_headers(tok)})
        assert again.status_code == 200


async def test_idle_sessions_close_after_mcp_session_idle_s(
    live_with: Callable[..., LiveApp], token: TokenFactory
) -> None:
    import anyio

    live = live_with(mcp_session_idle_s=0.5)
    tok = token()
    async with httpx.AsyncClient(base_url=live.base_url, timeout=10) as c:
        sid = await open_session(c, tok)
        assert (await ping(c, tok, sid)).status_code == 200
        with anyio.fail_after(10):
            while (await ping(c, tok, sid)).status_code != 404:  # noqa: ASYNC110  (server-side state)
                await anyio.sleep(1.0)  # longer than the idle TTL: the session must be gone


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
async def test_a_jwt_date_given_as_a_numeric_string_is_refused(
    live: LiveApp, token: TokenFactory, claim: str
) -> None:
    import time

    value = str(int(time.time()) + (3600 if claim == "exp" else -10))
    tok = token(extra_claims={claim: value})
    async with httpx.AsyncClient(base_url=live.base_url, timeout=10) as c:
        resp = await c.get("/v1/modules/scailink/sessions", headers=auth_headers(tok))
        assert resp.status_code == 401
        assert resp.json()["error"]["message"] == f"{claim} claim must be a number"
        resp = await c.post("/mcp", json=INIT, headers={**MCP_HEADERS, **auth_headers(tok)})
        assert resp.status_code == 401
