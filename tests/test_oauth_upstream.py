"""Hosted MCP servers behind OAuth (SPEC section 12), end to end over real HTTP on 127.0.0.1.

Real parts: ScaiLink served by uvicorn; an authlib authorization server (`tests/oauth_server.py`);
an upstream MCP server that accepts only that server's tokens (the SDK's resource-server auth); the
"browser" is an httpx client following redirects, signed in at the authorization server by a cookie.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import httpx2
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from sqlalchemy import text

from scailink_mcp.app import build_components, create_app
from scailink_mcp.config import Settings
from scailink_mcp.db import Database
from scailink_mcp.remote.oauth_stamps import STATE
from tests.conftest import TokenFactory, auth_headers
from tests.oauth_server import AuthServer, ProtectedUpstream
from tests.servers import ThreadedServer

pytestmark = pytest.mark.anyio

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


async def test_client_credentials_for_a_shared_server(
    gateway: Gateway, world: AuthServer, upstream: ProtectedUpstream, token: TokenFactory
) -> None:
    client = world.add_client(gateway.base_url + CALLBACK, grants_=("client_credentials",))
    admin = token("admin", groups=("tenant_admin",))
    server = await register(
        gateway,
        admin,
        name="shared-cc",
        endpoint_url=upstream.mcp_url,
        auth_type="oauth2",
        oauth={"grant": "client_credentials", "client_id": client.client_id, "scopes": ["mcp"]},
        credentials={"client_secret": client.client_secret},
        is_tenant_shared=True,
    )
    assert server["status"] == "active", server
    assert [t["name"] for t in server["capabilities"]["tools"]] == ["whoami"]
    assert server["oauth"] == {
        "grant": "client_credentials",
        "client_id": client.client_id,
        "scopes": ["mcp"],
        "issuer": world.issuer,
        "connected": True,
    }
    name = server["capabilities"]["tools"][0]["namespaced_name"]
    user = token("u1", groups=("tenant_user",))
    result = await call_whoami(gateway, user, name)
    assert not result.is_error, result
    assert text_of(result) == f"client:{client.client_id}"
    # Every token went to the resource it was asked for (RFC 8707).
    assert {t.resource for t in world.issued} == {upstream.mcp_url}


async def test_authorization_code_per_user(
    gateway: Gateway, world: AuthServer, upstream: ProtectedUpstream, token: TokenFactory
) -> None:
    client = world.add_client(gateway.base_url + CALLBACK)
    alice, bob = token("alice", groups=("tenant_admin",)), token("bob", groups=("tenant_user",))
    server = await register(gateway, alice, **code_server(upstream, client.client_id, client.client_secret))
    assert server["status"] == "pending_authorization"
    assert server["capabilities"]["tools"] == []
    assert server["oauth"]["connected"] is False

    # Alice (the owner) authorizes: the browser goes to the AS and back; discovery then runs.
    landed = await browser(
        f"{gateway.base_url}{REG}/{server['id']}/oauth/authorize", "alice", headers=auth_headers(alice)
    )
    assert landed.status_code == 200, landed.text
    assert landed.json()["data"] == {"server_id": server["id"], "connected": True}
    now = await detail(gateway, alice, server["id"])
    assert now["status"] == "active" and now["oauth"]["connected"] is True
    name = now["capabilities"]["tools"][0]["namespaced_name"]
    assert (await detail(gateway, bob, server["id"]))["oauth"]["connected"] is False

    result = await call_whoami(gateway, alice, name)
    assert not result.is_error and text_of(result) == "alice"

    # Bob has not authorized: the auth-required answer, with a URL that works in a browser as is.
    refused = await call_whoami(gateway, bob, name)
    assert refused.is_error
    error = refused.meta["scailink/error"]
    assert error["code"] == "SCAILINK_UPSTREAM_AUTH_REQUIRED"
    url = error["authorize_url"]
    assert url.startswith(f"{gateway.base_url}{REG}/{server['id']}/oauth/authorize?ticket=")
    landed = await browser(url, "bob")  # no bearer token: the ticket is the proof
    assert landed.status_code == 200, landed.text
    result = await call_whoami(gateway, bob, name)
    assert not result.is_error and text_of(result) == "bob"
    # The ticket worked once.
    again = await browser(url, "bob")
    assert again.status_code == 422 and again.json()["error"]["details"][0]["reason"] == "already used"
    # Both users' tokens went to the upstream they were asked for, each under its user's subject.
    assert {(t.subject, t.resource) for t in world.issued} == {
        ("alice", upstream.mcp_url),
        ("bob", upstream.mcp_url),
    }


async def test_short_token_refreshed_without_a_failed_call_and_revoked_refresh(
    gateway: Gateway, world: AuthServer, upstream: ProtectedUpstream, token: TokenFactory
) -> None:
    world.access_ttl_s = 5
    client = world.add_client(gateway.base_url + CALLBACK)
    alice = token("alice", groups=("tenant_admin",))
    server = await register(gateway, alice, **code_server(upstream, client.client_id, client.client_secret))
    await browser(
        f"{gateway.base_url}{REG}/{server['id']}/oauth/authorize", "alice", headers=auth_headers(alice)
    )
    name = (await detail(gateway, alice, server["id"]))["capabilities"]["tools"][0]["namespaced_name"]
    deadline = time.monotonic() + 9  # past the first token's 5 s
    calls = 0
    async with mcp(gateway.mcp_url, alice) as session:
        while time.monotonic() < deadline:
            result = await session.call_tool(name, {})
            assert not result.is_error, result
            calls += 1
            await anyio.sleep(0.5)
    assert world.refreshes >= 1, "the token was never refreshed"
    assert "rejected" not in upstream.verifier.seen, "a call reached the upstream with an expired token"
    assert calls >= 8  # calls kept going across the first token's expiry

    # The refresh token is revoked at the AS: once the access token expires, the answer is auth-required.
    world.revoke_refresh_tokens("alice")
    with anyio.fail_after(10):
        while True:
            result = await call_whoami(gateway, alice, name)
            if result.is_error:
                break
            await anyio.sleep(0.5)
    assert result.meta["scailink/error"]["code"] == "SCAILINK_UPSTREAM_AUTH_REQUIRED", result.meta
    assert (await detail(gateway, alice, server["id"]))["oauth"]["connected"] is False


async def test_state_replayed_expired_forged_or_for_another_tenant_is_refused(
    gateway: Gateway, world: AuthServer, upstream: ProtectedUpstream, token: TokenFactory
) -> None:
    client = world.add_client(gateway.base_url + CALLBACK)
    alice = token("alice", groups=("tenant_admin",))
    server = await register(gateway, alice, **code_server(upstream, client.client_id, client.client_secret))
    start = f"{gateway.base_url}{REG}/{server['id']}/oauth/authorize"
    callback_url = await stop_at_callback(start, "alice", headers=auth_headers(alice))
    async with httpx.AsyncClient(timeout=30) as b:
        first = await b.get(callback_url)
        assert first.status_code == 200, first.text
        replay = await b.get(callback_url)
    assert replay.status_code == 422
    assert replay.json()["error"]["details"] == [{"field": "state", "reason": "already used"}]

    # Another tenant's user cannot start one for this server (invisible: 404) ...
    eve = token("eve", tenant="t2", groups=("tenant_admin",))
    async with rest(gateway) as c:
        resp = await c.get(f"{REG}/{server['id']}/oauth/authorize", headers=auth_headers(eve))
    assert resp.status_code == 404
    # ... and a state naming another tenant (as a bug elsewhere could mint) is refused at the callback.
    stamps = gateway.parts.registry.oauth.stamps
    assert stamps is not None
    foreign = stamps.mint(STATE, tenant_id="t2", user_id="eve", server_id=server["id"], base=gateway.base_url)
    code = parse_qs(urlsplit(callback_url).query)
    async with httpx.AsyncClient(timeout=30) as b:
        resp = await b.get(gateway.base_url + CALLBACK, params={"state": foreign, "code": code["code"][0]})
        assert resp.status_code == 404
        # A forged state (the MAC does not match) and an expired one.
        forged = foreign[:-2] + ("AA" if not foreign.endswith("AA") else "BB")
        resp = await b.get(gateway.base_url + CALLBACK, params={"state": forged, "code": "x"})
        assert (
            resp.status_code == 422
            and resp.json()["error"]["details"][0]["reason"] == "not issued by this gateway"
        )
        old = stamps.clock
        stamps.clock = lambda: old() - 601  # a state minted 601 s ago (valid 600 s)
        try:
            stale = stamps.mint(
                STATE, tenant_id="t1", user_id="alice", server_id=server["id"], base=gateway.base_url
            )
        finally:
            stamps.clock = old
        resp = await b.get(gateway.base_url + CALLBACK, params={"state": stale, "code": "x"})
        assert resp.status_code == 422 and resp.json()["error"]["details"][0]["reason"] == "expired"


async def test_no_token_in_responses_logs_audit_or_database(
    gateway: Gateway,
    world: AuthServer,
    upstream: ProtectedUpstream,
    token: TokenFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    client = world.add_client(gateway.base_url + CALLBACK)
    alice = token("alice", groups=("tenant_admin",))
    bodies: list[str] = []
    server = await register(gateway, alice, **code_server(upstream, client.client_id, client.client_secret))
    landed = await browser(
        f"{gateway.base_url}{REG}/{server['id']}/oauth/authorize", "alice", headers=auth_headers(alice)
    )
    bodies.append(landed.text)
    bodies.append(json.dumps(await detail(gateway, alice, server["id"])))
    name = json.loads(bodies[-1])["capabilities"]["tools"][0]["namespaced_name"]
    result = await call_whoami(gateway, alice, name)
    bodies.append(result.model_dump_json())
    async with rest(gateway) as c:
        resp = await c.delete(f"{REG}/{server['id']}/oauth/token", headers=auth_headers(alice))
        assert resp.status_code == 204
        with anyio.fail_after(10):  # audit rows are written in batches, off the request path
            while True:
                audit = await c.get("/v1/modules/scailink/audit", headers=auth_headers(alice))
                events = {item["event"] for item in audit.json()["data"]["items"]}
                if {"oauth.authorize", "oauth.disconnect"} <= events:
                    break
                await anyio.sleep(0.2)
    bodies.append(audit.text)
    secrets_ = {t.access_token for t in world.issued} | {
        t.refresh_token for t in world.issued if t.refresh_token
    }
    secrets_.add(client.client_secret or "")
    assert len(secrets_) >= 3
    with gateway.db.engine.connect() as conn:
        dump = []
        for table in (
            "oauth_token",
            "oauth_client",
            "credential",
            "audit_event",
            "remote_server",
            "oauth_nonce",
        ):
            for row in conn.execute(text(f"SELECT * FROM {table}")):
                dump.append(" ".join(str(v) for v in row))
    # Every log line of the process but the test authorization server's own (authlib logs what it issues).
    logs = "\n".join(
        f"{r.getMessage()} {r.__dict__}" for r in caplog.records if not r.name.startswith("authlib")
    )
    assert "oauth" in logs.lower() or "upstream" in logs.lower()  # the capture did see the flow
    haystacks = {"responses": "\n".join(bodies), "logs": logs, "database": "\n".join(dump)}
    for where, haystack in haystacks.items():
        for secret in secrets_:
            assert secret not in haystack, f"a token or secret in the {where}"
    assert world.tokens[next(iter(world.tokens))].revoked or any(t.revoked for t in world.issued)
