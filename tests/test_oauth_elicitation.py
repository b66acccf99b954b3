"""URL-mode elicitation of an upstream authorization (SPEC section 12, MCP 2025-11-25): a client that
declares `capabilities.elicitation.url` gets the -32042 error with the authorize URL, and
`notifications/elicitation/complete` once the browser flow is done; other clients (no capability,
or the 2026-07-28 era) keep the `isError` answer.

Real parts: ScaiLink under uvicorn, the authlib authorization server and its SDK resource-server
upstream (`tests/oauth_server.py`), the SDK's `ClientSession` over Streamable HTTP; the browser is an
httpx client following redirects.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError, UrlElicitationRequiredError
from mcp_types import URL_ELICITATION_REQUIRED

from scailink_mcp.events import UpstreamAuthorized
from scailink_mcp.redis_bus import decode, encode
from tests import oauth_harness
from tests.conftest import TokenFactory, auth_headers
from tests.oauth_harness import REG, Gateway, authorized, browser, text_of
from tests.oauth_server import AuthServer, ProtectedUpstream

pytestmark = pytest.mark.anyio
world, upstream, gateway = oauth_harness.world, oauth_harness.upstream, oauth_harness.gateway


class Client:
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
async def session(
    url: str, tok: str, heard: Client, *, url_mode: bool, era: str = "2025-11-25"
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


async def test_a_url_mode_client_is_asked_through_an_elicitation_and_hears_it_complete(
    gateway: Gateway, world: AuthServer, upstream: ProtectedUpstream, token: TokenFactory
) -> None:
    alice, bob = token("alice", groups=("tenant_admin",)), token("bob", groups=("tenant_user",))
    server_id, name = await authorized(gateway, world, upstream, alice)
    prefix = f"{gateway.base_url}{REG}/{server_id}/oauth/authorize?ticket="
    heard = Client()
    async with session(gateway.mcp_url, bob, heard, url_mode=True) as s:
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
    heard = Client()
    url = f"{gateway.base_url}{REG}/{server_id}/mcp"
    async with session(url, bob, heard, url_mode=True) as s:
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
        heard = Client()
        async with session(gateway.mcp_url, tok, heard, url_mode=url_mode, era=era) as s:
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
