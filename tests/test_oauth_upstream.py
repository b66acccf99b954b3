"""Hosted MCP servers behind OAuth (SPEC section 12), end to end over real HTTP on 127.0.0.1.

Real parts: ScaiLink served by uvicorn; an authlib authorization server (`tests/oauth_server.py`);
an upstream MCP server that accepts only that server's tokens (the SDK's resource-server auth); the
"browser" is an httpx client following redirects, signed in at the authorization server by a cookie.
"""

from __future__ import annotations

import json
import logging
import time
from urllib.parse import parse_qs, urlencode, urlsplit

import anyio
import httpx
import pytest
from sqlalchemy import text

from scailink_mcp.remote.oauth_stamps import STATE
from tests import oauth_harness
from tests.conftest import TokenFactory, auth_headers
from tests.oauth_harness import (
    CALLBACK,
    REG,
    Gateway,
    browser,
    call_whoami,
    code_server,
    detail,
    mcp,
    register,
    rest,
    stop_at_callback,
    text_of,
)
from tests.oauth_server import AuthServer, ProtectedUpstream

pytestmark = pytest.mark.anyio
# The fixtures this module uses, shared with the other OAuth tests.
world, upstream, gateway = oauth_harness.world, oauth_harness.upstream, oauth_harness.gateway


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


async def test_pkce_s256_and_the_issuer_of_the_answer_are_checked(
    gateway: Gateway, world: AuthServer, upstream: ProtectedUpstream, token: TokenFactory
) -> None:
    """The authorization request carries an S256 challenge (authlib then checks the verifier at the
    token endpoint), and an answer whose `iss` is not the issuer asked, or that lacks the `iss` the
    server advertises, is refused (RFC 9207: a mix-up attack)."""
    client = world.add_client(gateway.base_url + CALLBACK)
    alice = token("alice", groups=("tenant_admin",))
    server = await register(gateway, alice, **code_server(upstream, client.client_id, client.client_secret))
    start = f"{gateway.base_url}{REG}/{server['id']}/oauth/authorize"

    def without(url: str, name: str, value: str | None = None) -> str:
        parts = urlsplit(url)
        query = {k: v[0] for k, v in parse_qs(parts.query).items() if k != name}
        if value is not None:
            query[name] = value
        return parts._replace(query=urlencode(query)).geturl()

    async with httpx.AsyncClient(timeout=30) as b:
        for tampered in (
            lambda url: without(url, "iss", "https://mix-up.example"),
            lambda url: without(url, "iss"),
        ):
            landing = await stop_at_callback(start, "alice", headers=auth_headers(alice))
            [pending] = world.codes.values()
            assert pending.code_challenge_method == "S256" and pending.code_challenge
            assert parse_qs(urlsplit(landing).query)["iss"] == [world.issuer]
            resp = await b.get(tampered(landing))
            assert resp.status_code == 422 and resp.json()["error"]["details"][0]["field"] == "iss", resp.text
            world.codes.clear()  # the code was never exchanged
        assert world.grant_requests["authorization_code"] == 0
        assert (await detail(gateway, alice, server["id"]))["oauth"]["connected"] is False
        assert (
            await b.get(await stop_at_callback(start, "alice", headers=auth_headers(alice)))
        ).status_code == 200
    assert world.grant_requests["authorization_code"] == 1


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
