"""The life of an upstream OAuth client and its tokens (SPEC section 12), over real HTTP on 127.0.0.1:
dynamic client registration (RFC 7591) for an allowed issuer and its refusal for another, a 401 on
a revoked access token answered by one refresh and a retry, and refresh failures answered with the
documented errors (never a 500), and `scailink kek rotate` re-wrapping the sealed tokens.

Real parts: ScaiLink under uvicorn, the authlib authorization server and the SDK resource-server
upstream of `tests/oauth_server.py`; the browser is an httpx client following redirects.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest
from pydantic import SecretStr
from sqlalchemy import event, text
from sqlmodel import select

from scailink_mcp.config import Settings
from scailink_mcp.crypto import Keyring, generate_kek, rotate_credentials
from scailink_mcp.db import Database
from scailink_mcp.models import OAuthNonce
from scailink_mcp.remote.oauth_stamps import STATE, Stamps
from scailink_mcp.remote.oauth_tokens import rotate_tokens
from tests import oauth_harness
from tests.conftest import TokenFactory, auth_headers
from tests.oauth_harness import (
    CALLBACK,
    REG,
    Gateway,
    authorized,
    browser,
    call_whoami,
    detail,
    mcp,
    register,
    rest,
    text_of,
)
from tests.oauth_server import AuthServer, ProtectedUpstream

pytestmark = pytest.mark.anyio
# The fixtures this module uses, shared with the other OAuth tests.
world, upstream, gateway = oauth_harness.world, oauth_harness.upstream, oauth_harness.gateway


def dcr_server(upstream: ProtectedUpstream) -> dict[str, Any]:
    """A shared authorization-code server registered without a client id (nor a secret)."""
    return {
        "name": "dyn",
        "endpoint_url": upstream.mcp_url,
        "auth_type": "oauth2",
        "oauth": {"grant": "authorization_code", "scopes": ["mcp"]},
        "is_tenant_shared": True,
    }


def database_text(gw: Gateway) -> str:
    with gw.db.engine.connect() as conn:
        tables = ("oauth_token", "oauth_client", "credential", "audit_event", "remote_server", "oauth_nonce")
        return "\n".join(
            " ".join(str(v) for v in row)
            for table in tables
            for row in conn.execute(text(f"SELECT * FROM {table}"))
        )


async def invoke(gw: Gateway, tok: str, user: str, name: str) -> tuple[int, dict[str, Any]]:
    """A REST invoke (the same path as an MCP `tools/call`): its status and body."""
    async with rest(gw) as c:
        resp = await c.post(
            f"/v1/modules/scailink/users/{user}/tools/{name}/invoke",
            json={"arguments": {}},
            headers=auth_headers(tok),
        )
    body: dict[str, Any] = resp.json()
    return resp.status_code, body


# ---- dynamic client registration (RFC 7591) -------------------------------------------------------


async def test_dynamic_client_registration_for_an_allowed_issuer(
    settings_factory: Callable[..., Settings],
    world: AuthServer,
    upstream: ProtectedUpstream,
    token: TokenFactory,
) -> None:
    alice, bob = token("alice", groups=("tenant_admin",)), token("bob", groups=("tenant_user",))
    with Gateway(settings_factory, oauth_dcr_allowed_issuers=[world.issuer]) as gw:
        server = await register(gw, alice, **dcr_server(upstream))
        assert server["status"] == "pending_authorization"
        assert server["oauth"]["client_id"] is None and server["credential_fields"] == []
        assert world.registrations == 0  # registering the server asks the authorization server nothing

        landed = await browser(
            f"{gw.base_url}{REG}/{server['id']}/oauth/authorize", "alice", headers=auth_headers(alice)
        )
        assert landed.status_code == 200, landed.text
        assert world.registrations == 1
        asked = world.registered[0]
        assert asked["redirect_uris"] == [gw.base_url + CALLBACK]
        assert set(asked["grant_types"]) == {"authorization_code", "refresh_token"}
        now = await detail(gw, alice, server["id"])
        issued = next(c for c in world.clients.values() if c.client_id.startswith("dyn-"))
        assert now["oauth"]["client_id"] == issued.client_id
        assert now["credential_fields"] == ["client_secret"]  # the issued secret, sealed like any credential
        assert now["status"] == "active"
        name = now["capabilities"]["tools"][0]["namespaced_name"]
        assert text_of(await call_whoami(gw, alice, name)) == "alice"

        # A second user authorizes with the same registered client: no second registration.
        refused = await call_whoami(gw, bob, name)
        url = refused.meta["scailink/error"]["authorize_url"]
        assert (await browser(url, "bob")).status_code == 200
        assert text_of(await call_whoami(gw, bob, name)) == "bob"
        assert world.registrations == 1
        assert {t.client_id for t in world.issued} == {issued.client_id}

        # The issued secret is in no answer and in no column in plaintext.
        assert issued.client_secret is not None
        assert issued.client_secret not in landed.text + str(now)
        assert issued.client_secret not in database_text(gw)


async def test_dynamic_client_registration_refused_for_an_issuer_not_allowed(
    settings_factory: Callable[..., Settings],
    world: AuthServer,
    upstream: ProtectedUpstream,
    token: TokenFactory,
) -> None:
    alice = token("alice", groups=("tenant_admin",))
    with Gateway(settings_factory, oauth_dcr_allowed_issuers=["https://other-issuer.example"]) as gw:
        server = await register(gw, alice, **dcr_server(upstream))
        assert server["status"] == "pending_authorization"
        async with rest(gw) as c:
            resp = await c.get(f"{REG}/{server['id']}/oauth/authorize", headers=auth_headers(alice))
        assert resp.status_code == 422, resp.text
        error = resp.json()["error"]
        assert error["code"] == "SCAILINK_VALIDATION_ERROR"
        assert error["details"] == [
            {
                "field": "oauth.client_id",
                "reason": "required (issuer not in SCAILINK_OAUTH_DCR_ALLOWED_ISSUERS)",
            }
        ]
        assert world.registrations == 0 and world.clients == {}
        assert (await detail(gw, alice, server["id"]))["oauth"]["client_id"] is None


# ---- refresh ----------------------------------------------------------------------------------------


async def test_a_401_on_a_revoked_access_token_refreshes_once_and_retries(
    gateway: Gateway, world: AuthServer, upstream: ProtectedUpstream, token: TokenFactory
) -> None:
    alice = token("alice", groups=("tenant_admin",))
    _, name = await authorized(gateway, world, upstream, alice)
    async with mcp(gateway.mcp_url, alice) as session:
        assert text_of(await session.call_tool(name, {})) == "alice"  # a warm pooled session from here
        seen = len(upstream.verifier.seen)
        # The authorization server stops accepting the access token ScaiLink still holds as fresh.
        assert world.expire_access_tokens("alice") == 1
        assert world.grant_requests["refresh_token"] == 0
        result = await session.call_tool(name, {})
        assert not result.is_error, result
        assert text_of(result) == "alice"
        # One request was refused, one refresh followed, and the same request was sent again.
        assert upstream.verifier.seen[seen:].count("rejected") == 1
        assert world.grant_requests["refresh_token"] == 1 and world.refreshes == 1
        # Calls go on with the new token and no further refresh.
        for _ in range(3):
            assert text_of(await session.call_tool(name, {})) == "alice"
    assert world.grant_requests["refresh_token"] == 1
    assert upstream.verifier.seen[seen:].count("rejected") == 1


async def test_a_refused_refresh_on_a_401_answers_auth_required(
    gateway: Gateway, world: AuthServer, upstream: ProtectedUpstream, token: TokenFactory
) -> None:
    alice = token("alice", groups=("tenant_admin",))
    server_id, name = await authorized(gateway, world, upstream, alice)
    assert text_of(await call_whoami(gateway, alice, name)) == "alice"
    world.expire_access_tokens("alice")
    world.revoke_refresh_tokens("alice")
    with anyio.fail_after(20):  # a bounded answer, never a hang until a timeout
        status, body = await invoke(gateway, alice, "alice", name)
    assert status == 403, body  # REST: the error envelope of SPEC section 2
    assert body["error"]["code"] == "SCAILINK_UPSTREAM_AUTH_REQUIRED", body
    assert body["error"]["details"]["authorize_url"].startswith(
        f"{gateway.base_url}{REG}/{server_id}/oauth/authorize?ticket="
    )
    assert (await detail(gateway, alice, server_id))["oauth"]["connected"] is False
    # The URL works: the user authorizes again and calls go on.
    # MCP: the same answer as a tool error with the URL in `_meta`.
    world.expire_access_tokens("alice")
    refused = await call_whoami(gateway, alice, name)
    assert refused.is_error and refused.meta["scailink/error"]["code"] == "SCAILINK_UPSTREAM_AUTH_REQUIRED"
    assert (await browser(body["error"]["details"]["authorize_url"], "alice")).status_code == 200
    assert text_of(await call_whoami(gateway, alice, name)) == "alice"
    async with rest(gateway) as c:
        with anyio.fail_after(10):  # audit rows are written in batches, off the request path
            while True:
                audit = await c.get(
                    "/v1/modules/scailink/audit",
                    params={"event": "oauth.refresh"},
                    headers=auth_headers(alice),
                )
                items = audit.json()["data"]["items"]
                if items:
                    break
                await anyio.sleep(0.2)
    assert [(i["outcome"], i["error_code"], i["target"]) for i in items] == [
        ("error", "SCAILINK_UPSTREAM_ERROR", server_id)
    ]


async def test_an_authorization_server_down_at_refresh_is_an_upstream_error_and_keeps_the_token(
    gateway: Gateway, world: AuthServer, upstream: ProtectedUpstream, token: TokenFactory
) -> None:
    """A token endpoint that answers 503 is not the user's doing: re-authorizing would not help, so the
    call answers SCAILINK_UPSTREAM_ERROR (502), the token is kept, and the next call refreshes."""
    alice = token("alice", groups=("tenant_admin",))
    server_id, name = await authorized(gateway, world, upstream, alice)
    assert text_of(await call_whoami(gateway, alice, name)) == "alice"
    world.expire_access_tokens("alice")
    world.token_failure = 503
    with anyio.fail_after(20):
        status, body = await invoke(gateway, alice, "alice", name)
    assert status == 502 and body["error"]["code"] == "SCAILINK_UPSTREAM_ERROR", body
    assert body["error"]["details"] is None or "authorize_url" not in body["error"]["details"]
    failed = await call_whoami(gateway, alice, name)
    assert failed.is_error and failed.meta["scailink/error"]["code"] == "SCAILINK_UPSTREAM_ERROR"
    assert (await detail(gateway, alice, server_id))["oauth"]["connected"] is True
    world.token_failure = None
    status, body = await invoke(gateway, alice, "alice", name)
    assert status == 200 and body["data"].get("isError") is not True, body
    assert body["data"]["content"][0]["text"] == "alice"


# ---- KEK rotation ------------------------------------------------------------------------------------


async def test_kek_rotate_rewraps_the_sealed_tokens(
    settings_factory: Callable[..., Settings],
    world: AuthServer,
    upstream: ProtectedUpstream,
    token: TokenFactory,
) -> None:
    old, new = generate_kek(), generate_kek()
    alice = token("alice", groups=("tenant_admin",))
    with Gateway(settings_factory, encryption_local_kek=SecretStr(old)) as gw:
        server_id, name = await authorized(gw, world, upstream, alice)
        db = gw.db
    old_id = Keyring(old).primary_id
    with db.engine.connect() as conn:
        assert {r[0] for r in conn.execute(text("SELECT kek_id FROM oauth_token"))} == {old_id}
    # The operator's rotation (new KEK primary, the old one still known), as `scailink kek rotate` runs it.
    keyring = Keyring(new, [old])
    assert rotate_credentials(db, keyring) + rotate_tokens(db, keyring) == 2  # client_secret and one token
    with db.engine.connect() as conn:
        assert {r[0] for r in conn.execute(text("SELECT kek_id FROM oauth_token"))} == {keyring.primary_id}
    assert rotate_tokens(db, keyring) == 0  # resumable: nothing left
    # The old KEK removed: the stored token still opens and a call works without a new authorization.
    with Gateway(settings_factory, encryption_local_kek=SecretStr(new)) as gw2:
        assert (await detail(gw2, alice, server_id))["oauth"]["connected"] is True
        assert text_of(await call_whoami(gw2, alice, name)) == "alice"
    assert world.grant_requests["authorization_code"] == 1 and world.grant_requests["refresh_token"] == 0


# ---- the hot path and housekeeping -----------------------------------------------------------------


async def test_a_warm_call_through_an_oauth_server_queries_no_database(
    gateway: Gateway, world: AuthServer, upstream: ProtectedUpstream, token: TokenFactory
) -> None:
    alice = token("alice", groups=("tenant_admin",))
    _, name = await authorized(gateway, world, upstream, alice)
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # The audit writer's batched inserts run in their own background task, off the call path.
        if not statement.lstrip().upper().startswith(("INSERT INTO AUDIT_EVENT", "BEGIN", "COMMIT")):
            statements.append(statement)

    async with mcp(gateway.mcp_url, alice) as session:
        assert text_of(await session.call_tool(name, {})) == "alice"  # warm-up: token and session
        event.listen(gateway.db.engine, "before_cursor_execute", count)
        try:
            for _ in range(20):
                assert text_of(await session.call_tool(name, {})) == "alice"
        finally:
            event.remove(gateway.db.engine, "before_cursor_execute", count)
    assert statements == [], "a warm call must not query the database"


def test_using_a_stamp_prunes_the_expired_used_ones(sqlite_url: str) -> None:
    """`oauth_nonce` holds used states and tickets until they expire; each new use deletes the expired
    rows (done on write: no background task), so the table stays as small as the last TTL's uses."""
    db = Database(sqlite_url)
    db.migrate()
    now = time.time()
    stamps = Stamps(Keyring(generate_kek()), ttl_s=600)
    with db.session() as session:
        session.add(OAuthNonce(id="old" * 8, expires_at=datetime.fromtimestamp(now - 1, UTC)))
        session.add(OAuthNonce(id="live" * 8, expires_at=datetime.fromtimestamp(now + 300, UTC)))
        session.commit()
        stamp = stamps.check(STATE, stamps.mint(STATE, tenant_id="t1", user_id="u1", server_id="s1"))
        stamps.consume(session, stamp)
        ids = set(session.exec(select(OAuthNonce.id)).all())
    assert "old" * 8 not in ids and "live" * 8 in ids
    assert len(ids) == 2  # the live one and the stamp just used


async def test_a_health_check_of_a_per_user_server_sends_no_users_token(
    gateway: Gateway, world: AuthServer, upstream: ProtectedUpstream, token: TokenFactory
) -> None:
    """The upstream's Bearer 401 to a request without a token counts as reachable (README)."""
    alice = token("alice", groups=("tenant_admin",))
    server_id, _ = await authorized(gateway, world, upstream, alice)
    seen = len(upstream.verifier.seen)
    assert await gateway.parts.health.check(server_id) == "ok"
    assert upstream.verifier.seen[seen:] == [], "the health check sent a user's token"
    upstream.__exit__(None, None, None)  # the upstream goes away: the check fails
    assert await gateway.parts.health.check(server_id) != "ok"


async def test_a_health_check_of_a_per_user_server_over_legacy_sse_sends_no_users_token(
    gateway: Gateway, world: AuthServer, token: TokenFactory
) -> None:
    """As above over the legacy SSE transport: the unauthenticated GET of the SSE endpoint answered
    401 with a Bearer challenge counts as reachable; calls go over SSE with the user's token."""
    alice = token("alice", groups=("tenant_admin",))
    with ProtectedUpstream(world, transport="sse") as upstream:
        server_id, name = await authorized(gateway, world, upstream, alice, transport="sse")
        assert text_of(await call_whoami(gateway, alice, name)) == "alice"
        seen = len(upstream.verifier.seen)
        assert await gateway.parts.health.check(server_id) == "ok"
        assert upstream.verifier.seen[seen:] == [], "the health check sent a user's token"
    assert await gateway.parts.health.check(server_id) != "ok"  # the upstream went away: the check fails
