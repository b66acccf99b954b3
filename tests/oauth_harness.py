"""What the OAuth tests share: ScaiLink served on a port known before its settings, the authlib
authorization server and its protected upstream as fixtures, and the "browser" and MCP helpers.

Real parts only: every helper speaks HTTP to servers on 127.0.0.1 (`tests/oauth_server.py`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import httpx2
import mcp_types as types
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError, UrlElicitationRequiredError
from mcp_types import URL_ELICITATION_REQUIRED

from scailink_mcp.app import build_components, create_app
from scailink_mcp.config import Settings
from scailink_mcp.db import Database
from tests.conftest import auth_headers
from tests.oauth_server import AuthServer, ProtectedUpstream
from tests.servers import ThreadedServer

REG = "/v1/modules/scailink/remote-servers"
CALLBACK = "/v1/modules/scailink/oauth/callback"


class Gateway(ThreadedServer):
    """ScaiLink on a port known before its settings are (its `public_url` is its own address)."""

    def __init__(self, make_settings: Callable[..., Settings], **overrides: Any) -> None:
        holder: dict[str, Any] = {}

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await holder["app"](scope, receive, send)

        super().__init__(app, lifespan="on", timeout_graceful_shutdown=2)
        self.settings = make_settings(public_url=self.base_url, **overrides)
        db = Database(self.settings.effective_database_url)
        db.migrate()
        self.db = db
        self.parts = build_components(self.settings, db)
        holder["app"] = create_app(self.settings, self.parts)
        self.mcp_url = f"{self.base_url}/mcp"


@pytest.fixture
def world() -> Iterator[AuthServer]:
    with AuthServer() as server:
        yield server


@pytest.fixture
def upstream(world: AuthServer) -> Iterator[ProtectedUpstream]:
    with ProtectedUpstream(world) as server:
        yield server


@pytest.fixture
def gateway(settings_factory: Callable[..., Settings]) -> Iterator[Gateway]:
    with Gateway(settings_factory, oauth_refresh_skew_s=2.0) as gw:
        yield gw


@asynccontextmanager
async def mcp(url: str, tok: str) -> AsyncIterator[ClientSession]:
    async with (
        httpx2.AsyncClient(headers=auth_headers(tok), timeout=httpx2.Timeout(30, read=60)) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


def rest(gw: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=gw.base_url, timeout=30)


async def register(gw: Gateway, tok: str, **body: Any) -> dict[str, Any]:
    async with rest(gw) as c:
        resp = await c.post(REG, json=body, headers=auth_headers(tok))
    assert resp.status_code == 201, resp.text
    data: dict[str, Any] = resp.json()["data"]
    return data


async def detail(gw: Gateway, tok: str, server_id: str) -> dict[str, Any]:
    async with rest(gw) as c:
        resp = await c.get(f"{REG}/{server_id}", headers=auth_headers(tok))
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()["data"]
    return data


async def browser(url: str, as_user: str, *, headers: dict[str, str] | None = None) -> httpx.Response:
    """A signed-in browser opening `url` and following every redirect (to the AS and back)."""
    async with httpx.AsyncClient(follow_redirects=True, timeout=30, cookies={"as_user": as_user}) as b:
        return await b.get(url, headers=headers or {})


async def stop_at_callback(url: str, as_user: str, *, headers: dict[str, str] | None = None) -> str:
    """Follow the redirects up to the callback, without opening it: its URL (code, state, iss)."""
    async with httpx.AsyncClient(follow_redirects=False, timeout=30, cookies={"as_user": as_user}) as b:
        for _ in range(5):
            resp = await b.get(url, headers=headers or {})
            assert resp.status_code == 302, resp.text
            url = resp.headers["location"]
            if CALLBACK in url:
                return url
    raise AssertionError("no redirect to the callback")


def text_of(result: Any) -> str:
    return "".join(getattr(block, "text", "") for block in result.content)


async def call_whoami(gw: Gateway, tok: str, name: str) -> Any:
    async with mcp(gw.mcp_url, tok) as session:
        return await session.call_tool(name, {})


def code_server(upstream: ProtectedUpstream, client_id: str, secret: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "hosted",
        "endpoint_url": upstream.mcp_url,
        "auth_type": "oauth2",
        "oauth": {"grant": "authorization_code", "client_id": client_id, "scopes": ["mcp"]},
        "credentials": {"client_secret": secret},
        "is_tenant_shared": True,
        **extra,
    }


async def authorized(
    gw: Gateway, world: AuthServer, upstream: ProtectedUpstream, tok: str, **extra: Any
) -> tuple[str, str]:
    """Alice registers a shared authorization-code server (`extra`: more of the registration body) and
    authorizes it: (server id, tool name)."""
    client = world.add_client(gw.base_url + CALLBACK)
    assert client.client_secret is not None
    server = await register(gw, tok, **code_server(upstream, client.client_id, client.client_secret, **extra))
    landed = await browser(
        f"{gw.base_url}{REG}/{server['id']}/oauth/authorize", "alice", headers=auth_headers(tok)
    )
    assert landed.status_code == 200, landed.text
    name: str = (await detail(gw, tok, server["id"]))["capabilities"]["tools"][0]["namespaced_name"]
    return server["id"], name


# ---- SDK clients of URL-mode elicitation (test_oauth_elicitation.py, test_oauth_replicas.py) --------


class Heard:
    """What an SDK client session heard: the server's notifications and elicitation requests."""

    def __init__(self) -> None:
        self.notifications: list[Any] = []
        self.elicited: list[Any] = []
        self.completion = anyio.Event()

    async def on_message(self, message: Any) -> None:
        if not isinstance(message, Exception):
            self.notifications.append(message)
            if isinstance(message, types.ElicitCompleteNotification):
                self.completion.set()

    async def on_elicit(self, context: Any, params: Any) -> types.ElicitResult:
        self.elicited.append(params)  # never expected: the gateway does not wait on the user
        return types.ElicitResult(action="decline")

    def completed(self) -> list[str]:
        return [
            n.params.elicitation_id
            for n in self.notifications
            if isinstance(n, types.ElicitCompleteNotification)
        ]


@asynccontextmanager
async def sdk_session(
    url: str, tok: str, heard: Heard, *, url_mode: bool, era: str = "2025-11-25"
) -> AsyncIterator[ClientSession]:
    """An SDK client; `url_mode`: it has an elicitation callback, so it declares form and URL modes."""
    async with (
        httpx2.AsyncClient(headers=auth_headers(tok), timeout=httpx2.Timeout(30, read=60)) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(
            read,
            write,
            message_handler=heard.on_message,
            elicitation_callback=heard.on_elicit if url_mode else None,
        ) as s,
    ):
        if era == "2026-07-28":
            await s.discover()
        else:
            await s.initialize()
        assert s.protocol_version == era
        yield s


async def elicitation_required(s: ClientSession, name: str) -> UrlElicitationRequiredError:
    with pytest.raises(MCPError) as caught:
        await s.call_tool(name, {})
    assert caught.value.code == URL_ELICITATION_REQUIRED, caught.value.error
    return UrlElicitationRequiredError.from_error(caught.value.error)
