"""The audit of upstream OAuth (issue 17): an authorization (granted, and refused by the user at the
authorization server), a refresh that fails, and a disconnect are each one row naming the user and
the server; no row holds a token, a code, a state, a ticket or the client secret.

Real parts: ScaiLink under uvicorn, the authlib authorization server and its SDK resource-server
upstream (`tests/oauth_server.py`); the browser is an httpx client following redirects.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import anyio
import httpx
import pytest
from sqlalchemy import text

from tests import oauth_harness
from tests.conftest import TokenFactory, auth_headers
from tests.oauth_harness import (
    CALLBACK,
    REG,
    Gateway,
    authorized,
    browser,
    call_whoami,
    rest,
    stop_at_callback,
)
from tests.oauth_server import AuthServer, ProtectedUpstream

pytestmark = pytest.mark.anyio
world, upstream, gateway = oauth_harness.world, oauth_harness.upstream, oauth_harness.gateway


def oauth_rows(gw: Gateway) -> list[dict[str, Any]]:
    with gw.db.engine.connect() as conn:
        result = conn.execute(text("SELECT * FROM audit_event WHERE event LIKE 'oauth.%' ORDER BY ts"))
        return [dict(row._mapping) for row in result]


async def test_authorize_refresh_failure_and_disconnect_are_audited_without_a_secret(
    gateway: Gateway, world: AuthServer, upstream: ProtectedUpstream, token: TokenFactory
) -> None:
    alice, bob = token("alice", groups=("tenant_admin",)), token("bob", groups=("tenant_user",))
    server_id, name = await authorized(gateway, world, upstream, alice)  # oauth.authorize ok (alice)
    seen: set[str] = set()  # every one-time value of the flows, to look for in the rows

    # Bob is asked, opens the URL and says no at the authorization server: its error comes back.
    refused = await call_whoami(gateway, bob, name)
    url = refused.meta["scailink/error"]["authorize_url"]
    seen.add(parse_qs(urlsplit(url).query)["ticket"][0])
    landing = await stop_at_callback(url, "bob")
    state = parse_qs(urlsplit(landing).query)["state"][0]
    seen.update({state, parse_qs(urlsplit(landing).query)["code"][0]})
    denied = await browser(
        f"{gateway.base_url}{CALLBACK}?{urlencode({'state': state, 'error': 'access_denied'})}", "bob"
    )
    assert denied.status_code == 422, denied.text  # oauth.authorize denied (bob)

    # Bob tries again and agrees; later he disconnects.
    again = (await call_whoami(gateway, bob, name)).meta["scailink/error"]["authorize_url"]
    landing = await stop_at_callback(again, "bob")
    seen.update(v[0] for k, v in parse_qs(urlsplit(landing).query).items() if k in ("code", "state"))
    async with httpx.AsyncClient(timeout=30) as b:
        assert (await b.get(landing)).status_code == 200  # oauth.authorize ok (bob)
    async with rest(gateway) as c:
        resp = await c.delete(f"{REG}/{server_id}/oauth/token", headers=auth_headers(bob))
    assert resp.status_code == 204  # oauth.disconnect ok (bob)

    # Alice's refresh token is revoked at the authorization server: her next refresh fails.
    world.expire_access_tokens("alice")
    world.revoke_refresh_tokens("alice")
    failed = await call_whoami(gateway, alice, name)  # oauth.refresh error (alice)
    assert failed.meta["scailink/error"]["code"] == "SCAILINK_UPSTREAM_AUTH_REQUIRED"

    with anyio.fail_after(10):  # rows are written in batches, off the request path
        while True:
            rows = oauth_rows(gateway)
            if len(rows) >= 5:
                break
            await anyio.sleep(0.1)
    assert [(r["event"], r["outcome"], r["user_id"], r["error_code"]) for r in rows] == [
        ("oauth.authorize", "ok", "alice", None),
        ("oauth.authorize", "denied", "bob", "access_denied"),
        ("oauth.authorize", "ok", "bob", None),
        ("oauth.disconnect", "ok", "bob", None),
        ("oauth.refresh", "error", "alice", "SCAILINK_UPSTREAM_ERROR"),
    ]
    assert {(r["tenant_id"], r["target"]) for r in rows} == {("t1", server_id)}

    # No row of the whole audit log (tool calls included) holds a secret of these flows.
    seen |= {t.access_token for t in world.issued} | {t.refresh_token or "" for t in world.issued}
    seen |= {c.client_secret or "" for c in world.clients.values()}
    seen.discard("")
    assert len(seen) >= 8
    with gateway.db.engine.connect() as conn:
        dump = "\n".join(" ".join(map(str, row)) for row in conn.execute(text("SELECT * FROM audit_event")))
    assert "tool" in dump  # the tool calls are in it too
    for secret in seen:
        assert secret not in dump, "a token, code, state, ticket or secret in an audit row"
    assert "ticket=" not in dump
