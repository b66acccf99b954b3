"""URL-mode elicitation of an upstream authorization (SPEC section 12, MCP 2025-11-25): a client that
declares `capabilities.elicitation.url` gets the -32042 error with the authorize URL, and
`notifications/elicitation/complete` once the browser flow is done; other clients (no capability,
or the 2026-07-28 era) keep the `isError` answer.

Real parts: ScaiLink under uvicorn, the authlib authorization server and its SDK resource-server
upstream (`tests/oauth_server.py`), the SDK's `ClientSession` over Streamable HTTP; the browser is an
httpx client following redirects.
"""

from __future__ import annotations

import gc
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from mcp.server.connection import Connection

from scailink_mcp.errors import UpstreamAuthRequired
from scailink_mcp.events import UpstreamAuthorized
from scailink_mcp.mcp_elicitation import COMPLETE, UrlElicitations
from scailink_mcp.redis_bus import decode, encode
from tests import oauth_harness
from tests.conftest import TokenFactory
from tests.oauth_harness import (
    REG,
    Gateway,
    Heard,
    authorized,
    browser,
    elicitation_required,
    sdk_session,
    text_of,
)
from tests.oauth_server import AuthServer, ProtectedUpstream

pytestmark = pytest.mark.anyio
world, upstream, gateway = oauth_harness.world, oauth_harness.upstream, oauth_harness.gateway


async def test_a_url_mode_client_is_asked_through_an_elicitation_and_hears_it_complete(
    gateway: Gateway, world: AuthServer, upstream: ProtectedUpstream, token: TokenFactory
) -> None:
    alice, bob = token("alice", groups=("tenant_admin",)), token("bob", groups=("tenant_user",))
    server_id, name = await authorized(gateway, world, upstream, alice)
    prefix = f"{gateway.base_url}{REG}/{server_id}/oauth/authorize?ticket="
    heard = Heard()
    async with sdk_session(gateway.mcp_url, bob, heard, url_mode=True) as s:
        error = await elicitation_required(s, name)
        assert error.message.startswith("SCAILINK_UPSTREAM_AUTH_REQUIRED")
        [asked] = error.elicitations
        assert asked.mode == "url" and asked.url.startswith(prefix) and asked.elicitation_id
        assert heard.elicited == []  # an error to the client, never a request that waits on the user
        # The user opens the URL (no bearer token: the ticket is the proof) and authorizes.
        landed = await browser(asked.url, "bob")
        assert landed.status_code == 200, landed.text
        with anyio.fail_after(10):
            await heard.completion.wait()
        assert heard.completed() == [asked.elicitation_id]
        # The retry the notification invites works, with bob's own token.
        result = await s.call_tool(name, {})
        assert not result.is_error and text_of(result) == "bob"
    assert gateway.parts.mcp.elicitations.completed == 1
    assert len(gateway.parts.mcp.elicitations) == 0


async def test_the_per_server_endpoint_asks_the_same_way(
    gateway: Gateway, world: AuthServer, upstream: ProtectedUpstream, token: TokenFactory
) -> None:
    alice, bob = token("alice", groups=("tenant_admin",)), token("bob", groups=("tenant_user",))
    server_id, _ = await authorized(gateway, world, upstream, alice)
    heard = Heard()
    url = f"{gateway.base_url}{REG}/{server_id}/mcp"
    async with sdk_session(url, bob, heard, url_mode=True) as s:
        [asked] = (await elicitation_required(s, "whoami")).elicitations
        assert asked.url.startswith(f"{gateway.base_url}{REG}/{server_id}/oauth/authorize?ticket=")
        assert (await browser(asked.url, "bob")).status_code == 200
        with anyio.fail_after(10):
            await heard.completion.wait()
        assert text_of(await s.call_tool("whoami", {})) == "bob"


async def test_clients_without_url_mode_keep_the_tool_error(
    gateway: Gateway, world: AuthServer, upstream: ProtectedUpstream, token: TokenFactory
) -> None:
    """No elicitation capability (handshake era), or any 2026-07-28 client (-32042 and the completion
    notification are retired there): the `isError` result with the URL in `_meta`, which works."""
    alice, bob = token("alice", groups=("tenant_admin",)), token("bob", groups=("tenant_user",))
    carol = token("carol", groups=("tenant_user",))
    server_id, name = await authorized(gateway, world, upstream, alice)
    prefix = f"{gateway.base_url}{REG}/{server_id}/oauth/authorize?ticket="
    for who, tok, url_mode, era in (("bob", bob, False, "2025-11-25"), ("carol", carol, True, "2026-07-28")):
        heard = Heard()
        async with sdk_session(gateway.mcp_url, tok, heard, url_mode=url_mode, era=era) as s:
            refused = await s.call_tool(name, {})
            assert refused.is_error, refused
            error = (refused.meta or {})["scailink/error"]
            assert error["code"] == "SCAILINK_UPSTREAM_AUTH_REQUIRED" and error["authorize_url"].startswith(
                prefix
            )
            assert (await browser(error["authorize_url"], who)).status_code == 200
            assert text_of(await s.call_tool(name, {})) == who
            assert heard.completed() == [] and heard.elicited == []
    assert len(gateway.parts.mcp.elicitations) == 0


def test_the_completion_crosses_replicas_as_an_event() -> None:
    """`UpstreamAuthorized` travels the Redis event channel (the callback may land on another replica
    than the session's); a malformed one is refused."""
    event = UpstreamAuthorized("t1", "bob", "srv", "nonce-1")
    assert decode(encode(event, "w1")) == ("w1", event)
    broken = encode(event, "w1").replace('"nonce-1"', "7")
    with pytest.raises(ValueError):
        decode(broken)


async def test_pending_elicitations_are_bounded_expire_and_hold_no_session() -> None:
    """The table of elicitations waiting for a callback: capped (the oldest go first), each entry
    expires with its ticket, and a session that ended is not kept alive by it."""

    class Outbound:
        def __init__(self) -> None:
            self.sent: list[tuple[str, Any]] = []

        async def send_raw_request(self, method: str, params: Any, opts: Any = None) -> dict[str, Any]:
            raise AssertionError("no request is ever sent")

        async def notify(self, method: str, params: Any, opts: Any = None) -> None:
            self.sent.append((method, params))

    now = [100.0]
    table = UrlElicitations(ttl_s=600, max_pending=2, clock=lambda: now[0])
    outbound = Outbound()
    connection = Connection(outbound, protocol_version="2025-11-25")  # type: ignore[arg-type]
    held: list[Any] = [SimpleNamespace(session=SimpleNamespace(_connection=connection))]  # a handler's ctx

    def ask(nonce: str) -> None:
        table.required(
            held[0], UpstreamAuthRequired(authorize_url=f"https://gw/a?ticket={nonce}", elicitation_id=nonce)
        )

    def done(nonce: str) -> UpstreamAuthorized:
        return UpstreamAuthorized("t1", "bob", "srv", nonce)

    for nonce in ("n1", "n2", "n3"):
        ask(nonce)
    assert len(table) == 2  # n1, the oldest, made room
    await table.on_authorized(done("n1"))
    await table.on_authorized(done("n3"))
    assert outbound.sent == [(COMPLETE, {"elicitationId": "n3"})]
    now[0] += 601  # n2's ticket has expired: no completion for it, and the next answer prunes it
    await table.on_authorized(done("n2"))
    ask("n4")
    assert len(table) == 1 and len(outbound.sent) == 1
    held.clear()
    del connection
    gc.collect()
    await table.on_authorized(done("n4"))  # the session is gone: nothing sent, nothing raised
    assert len(table) == 0 and len(outbound.sent) == 1
