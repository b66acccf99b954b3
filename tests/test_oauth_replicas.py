"""Upstream OAuth on two replicas (SPEC sections 10 and 12): one refresh per token in the cluster, and
a URL-mode elicitation completed through the other replica.

Two ScaiLink apps, each served by its own uvicorn, share one database and the real Redis at
127.0.0.1:6379 (their own key prefix); the authorization server answers token requests slowly, so
calls on both replicas want the refresh at the same time. With refresh-token rotation a second
refresh would spend a used refresh token (`invalid_grant`) and log the user out: the authorization
server must see exactly one refresh.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import anyio
import pytest
from pydantic import SecretStr

from scailink_mcp.config import Settings
from scailink_mcp.crypto import generate_kek
from scailink_mcp.leases import RedisLease
from tests import oauth_harness
from tests.cluster import REDIS_URL, require_redis
from tests.conftest import TokenFactory
from tests.oauth_harness import (
    Gateway,
    Heard,
    authorized,
    call_whoami,
    elicitation_required,
    sdk_session,
    text_of,
)
from tests.oauth_server import AuthServer, ProtectedUpstream

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]
world, upstream = oauth_harness.world, oauth_harness.upstream

CALLS_PER_REPLICA = 4


def cluster_settings() -> dict[str, object]:
    require_redis()
    return {
        "redis_url": REDIS_URL,
        "redis_prefix": f"scailink-test-{uuid.uuid4().hex[:12]}",
        "encryption_local_kek": SecretStr(generate_kek()),  # one cluster: one KEK
    }


async def test_concurrent_calls_on_two_replicas_refresh_a_token_once(
    settings_factory: Callable[..., Settings],
    world: AuthServer,
    upstream: ProtectedUpstream,
    token: TokenFactory,
) -> None:
    shared = cluster_settings()
    alice = token("alice", groups=("tenant_admin",))
    with Gateway(settings_factory, **shared) as a, Gateway(settings_factory, **shared) as b:
        assert a.settings.effective_database_url == b.settings.effective_database_url
        assert isinstance(a.parts.lease, RedisLease) and isinstance(b.parts.lease, RedisLease)
        _, name = await authorized(a, world, upstream, alice)
        with anyio.fail_after(10):  # B learns of the new server through the event bus
            while True:
                first = await call_whoami(b, alice, name)
                if not first.is_error:
                    break
                await anyio.sleep(0.2)
        assert text_of(first) == "alice"
        assert text_of(await call_whoami(a, alice, name)) == "alice"  # both hold the token now
        assert world.grant_requests["refresh_token"] == 0

        # The authorization server stops accepting the access token; a refresh takes it 1 s.
        world.expire_access_tokens("alice")
        world.token_delay_s = 1.0
        texts: list[str] = []

        async def one(gw: Gateway) -> None:
            result = await call_whoami(gw, alice, name)
            texts.append("error" if result.is_error else text_of(result))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for _ in range(CALLS_PER_REPLICA):
                    tg.start_soon(one, a)
                    tg.start_soon(one, b)
        assert texts == ["alice"] * (2 * CALLS_PER_REPLICA)
        assert world.grant_requests["refresh_token"] == 1, world.grant_requests
        assert world.refreshes == 1


async def test_an_elicitation_completes_when_the_callback_lands_on_the_other_replica(
    settings_factory: Callable[..., Settings],
    world: AuthServer,
    upstream: ProtectedUpstream,
    token: TokenFactory,
) -> None:
    """Bob's MCP session is on B; the browser flow runs through A (the callback A's): the completion
    crosses on the Redis event channel and B sends `notifications/elicitation/complete`."""
    shared = cluster_settings()
    alice, bob = token("alice", groups=("tenant_admin",)), token("bob", groups=("tenant_user",))
    with Gateway(settings_factory, **shared) as a, Gateway(settings_factory, **shared) as b:
        _, name = await authorized(a, world, upstream, alice)  # the AS knows A's callback only
        heard = Heard()
        with anyio.fail_after(10):  # B learns of the new server through the event bus
            while True:
                if not (await call_whoami(b, alice, name)).is_error:
                    break
                await anyio.sleep(0.2)
        async with sdk_session(b.mcp_url, bob, heard, url_mode=True) as s:
            [asked] = (await elicitation_required(s, name)).elicitations
            assert asked.url.startswith(b.base_url)
            through_a = asked.url.replace(b.base_url, a.base_url, 1)  # the ticket works on every replica
            assert (await oauth_harness.browser(through_a, "bob")).status_code == 200
            with anyio.fail_after(10):
                await heard.completion.wait()
            assert heard.completed() == [asked.elicitation_id]
            assert text_of(await s.call_tool(name, {})) == "bob"
        assert b.parts.mcp.elicitations.completed == 1 and a.parts.mcp.elicitations.completed == 0
