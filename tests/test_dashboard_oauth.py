"""The dashboard's "Connect" and "Disconnect" of an upstream OAuth server (SPEC sections 11 and 12):
a signed-in user who has not authorized an `authorization_code` server (or whose token was revoked)
sees "Connect", which leads through the absolute authorize URL (one-time ticket bound to tenant,
user and server) to the authorization server and back to the dashboard; then "Disconnect" (a CSRF
form) forgets the token.

Real parts: ScaiLink under uvicorn, the authlib authorization server and its SDK resource-server
upstream (`tests/oauth_server.py`); the browser is the dashboard test client over real HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest

from tests import oauth_harness
from tests.conftest import TokenFactory, auth_headers
from tests.dashboard_client import DashboardClient
from tests.oauth_harness import CALLBACK, REG, Gateway, authorized, call_whoami, detail, register, text_of
from tests.oauth_server import AuthServer, ProtectedUpstream
from tests.upstream import UpstreamServer

pytestmark = pytest.mark.anyio
world, upstream, gateway = oauth_harness.world, oauth_harness.upstream, oauth_harness.gateway


@pytest.fixture
def upstream_server() -> Iterator[UpstreamServer]:
    """A plain MCP server (no OAuth)."""
    with UpstreamServer() as server:
        yield server


@asynccontextmanager
async def signed_in(gw: Gateway, tok: str, as_user: str) -> AsyncIterator[DashboardClient]:
    # `as_user`: who the test authorization server takes the browser for (its sign-in cookie).
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=30, cookies={"as_user": as_user}) as client:
        dash = DashboardClient(client)
        assert (await dash.sign_in(tok)).status_code == 303
        yield dash


def connect_link(html: str, server_id: str) -> bool:
    return f'href="/dashboard/servers/{server_id}/connect"' in html


def disconnect_form(html: str, server_id: str) -> bool:
    return f'action="/dashboard/servers/{server_id}/disconnect"' in html


async def connect(dash: DashboardClient, gw: Gateway, server_id: str) -> httpx.Response:
    """Click "Connect": the dashboard sends the browser to the authorize URL, then on to the AS and
    back to the callback; the callback's page leads back to the dashboard."""
    start = await dash.get(f"/servers/{server_id}/connect")
    assert start.status_code == 303, start.text
    location = start.headers["location"]
    assert location.startswith(f"{gw.base_url}{REG}/{server_id}/oauth/authorize?ticket=")
    landed = await dash.client.get(location, follow_redirects=True)
    assert landed.status_code == 200, landed.text
    assert landed.url.path == CALLBACK and landed.headers["content-type"].startswith("text/html")
    assert landed.headers["x-request-id"] and landed.headers["cache-control"] == "no-store"
    return landed


async def test_connect_and_disconnect_from_the_dashboard(
    gateway: Gateway, world: AuthServer, upstream: ProtectedUpstream, token: TokenFactory
) -> None:
    alice, bob = token("alice", groups=("tenant_admin",)), token("bob", groups=("tenant_user",))
    server_id, name = await authorized(gateway, world, upstream, alice)
    pages: list[str] = []
    async with signed_in(gateway, bob, "bob") as dash:
        listing = (await dash.get("/servers")).text
        assert connect_link(listing, server_id) and not disconnect_form(listing, server_id)
        assert "not connected" in listing

        landed = await connect(dash, gateway, server_id)
        back = f"/dashboard/servers/{server_id}"
        assert f'content="0;url={back}"' in landed.text and f'href="{back}"' in landed.text
        assert "code=" not in landed.text and "state=" not in landed.text
        page = await dash.client.get(back)  # the page's link (and meta refresh): back on the dashboard
        assert page.status_code == 200 and disconnect_form(page.text, server_id)
        assert not connect_link(page.text, server_id)
        pages += [listing, landed.text, page.text]
        assert (await detail(gateway, bob, server_id))["oauth"]["connected"] is True
        assert text_of(await call_whoami(gateway, bob, name)) == "bob"  # bob's own token upstream
        assert {t.subject for t in world.issued} == {"alice", "bob"}

        # Disconnect is a state change: refused without the session's CSRF token.
        forged = await dash.client.post(
            f"/dashboard/servers/{server_id}/disconnect", data={"csrf_token": "x"}
        )
        assert forged.status_code == 403
        assert (await detail(gateway, bob, server_id))["oauth"]["connected"] is True
        done = await dash.post(f"/servers/{server_id}/disconnect")
        assert done.status_code == 303 and done.headers["location"] == back
        after = (await dash.client.get(back)).text
        pages.append(after)
        assert "disconnected" in after and connect_link(after, server_id)
        assert (await detail(gateway, bob, server_id))["oauth"]["connected"] is False
        assert any(t.revoked for t in world.issued if t.subject == "bob")  # asked of the AS (RFC 7009)
        refused = await call_whoami(gateway, bob, name)
        assert (
            refused.is_error and refused.meta["scailink/error"]["code"] == "SCAILINK_UPSTREAM_AUTH_REQUIRED"
        )
        # Alice's connection is hers: untouched.
        assert text_of(await call_whoami(gateway, alice, name)) == "alice"
    secrets_ = {t.access_token for t in world.issued} | {
        t.refresh_token for t in world.issued if t.refresh_token
    }
    for html in pages:
        assert not any(secret in html for secret in secrets_), "a token in a page"
        assert "ticket=" not in html  # the ticket is in the redirect only, never in a page


async def test_a_revoked_token_shows_connect_again_and_connect_works(
    gateway: Gateway, world: AuthServer, upstream: ProtectedUpstream, token: TokenFactory
) -> None:
    alice = token("alice", groups=("tenant_admin",))
    server_id, name = await authorized(gateway, world, upstream, alice)
    world.expire_access_tokens("alice")
    world.revoke_refresh_tokens("alice")
    refused = await call_whoami(gateway, alice, name)  # the failed refresh forgets the token
    assert refused.is_error and refused.meta["scailink/error"]["code"] == "SCAILINK_UPSTREAM_AUTH_REQUIRED"
    async with signed_in(gateway, alice, "alice") as dash:
        page = (await dash.get(f"/servers/{server_id}")).text
        assert connect_link(page, server_id) and "not connected" in page
        await connect(dash, gateway, server_id)
        assert disconnect_form((await dash.get("/servers")).text, server_id)
    assert text_of(await call_whoami(gateway, alice, name)) == "alice"


async def test_connect_is_offered_and_allowed_only_where_it_means_something(
    gateway: Gateway,
    world: AuthServer,
    upstream: ProtectedUpstream,
    token: TokenFactory,
    upstream_server: UpstreamServer,
) -> None:
    """Not for a server without OAuth, nor for one the caller cannot see (another tenant's), and the
    ticket of one user's Connect works once."""
    alice = token("alice", groups=("tenant_admin",))
    server_id, _ = await authorized(gateway, world, upstream, alice)
    plain = await register(
        gateway, alice, name="plain", endpoint_url=upstream_server.url, is_tenant_shared=True
    )
    async with signed_in(gateway, alice, "alice") as dash:
        listing = (await dash.get("/servers")).text
        assert not connect_link(listing, plain["id"]) and not disconnect_form(listing, plain["id"])
        refused = await dash.get(f"/servers/{plain['id']}/connect")
        assert refused.status_code == 422 and "nothing for a user to authorize" in refused.text
        # A ticket from Connect is one-time, like any other.
        location = (await dash.get(f"/servers/{server_id}/connect")).headers["location"]
        assert (await dash.client.get(location, follow_redirects=True)).status_code == 200
        again = await dash.client.get(location, follow_redirects=True)
        assert again.status_code == 422 and again.json()["error"]["details"][0]["reason"] == "already used"
    outsider = token("mallory", "t2", ("tenant_admin",))
    async with signed_in(gateway, outsider, "mallory") as dash:
        assert (await dash.get(f"/servers/{server_id}/connect")).status_code == 404
        assert (await dash.post(f"/servers/{server_id}/disconnect")).status_code == 404
    async with httpx.AsyncClient(base_url=gateway.base_url) as c:  # REST agrees: alice still connected
        resp = await c.get(f"{REG}/{server_id}", headers=auth_headers(alice))
    assert resp.json()["data"]["oauth"]["connected"] is True
