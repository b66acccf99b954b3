"""`remote/connector.py`, the pool's opener in the app, and `remote/pooled_session.py`, what the pool
holds of an opened session. The end-to-end paths (relayed sampling, re-subscription on reopen) are
`test_relay.py`'s; these pin the wiring: the one late binding, and where upstream notifications go."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import mcp_types as types
import pytest
from mcp.client.session import ClientSession

from scailink_mcp.app import build_components
from scailink_mcp.config import Settings
from scailink_mcp.errors import UpstreamError
from scailink_mcp.relay import Relay
from scailink_mcp.remote.answers import AnswerLimit
from scailink_mcp.remote.connector import Connector
from scailink_mcp.remote.pool import PoolKey
from scailink_mcp.remote.pooled_session import PooledSession
from scailink_mcp.remote.upstream import UpstreamSession
from scailink_mcp.subscriptions import Subscriptions
from tests.conftest import AppHarness

pytestmark = pytest.mark.anyio

KEY = PoolKey("s1", 1, "u1")


class RecordingRediscovery:
    def __init__(self) -> None:
        self.triggered: list[str] = []

    def trigger(self, server_id: str) -> None:
        self.triggered.append(server_id)


class RecordingSubscriptions(Subscriptions):
    def __init__(self) -> None:
        super().__init__()
        self.updates: list[tuple[PoolKey, str]] = []

    async def updated(self, pool_key: PoolKey, upstream_uri: str) -> int:
        self.updates.append((pool_key, upstream_uri))
        return 0


def test_the_app_binds_the_relay_once(settings_factory: Callable[..., Settings]) -> None:
    parts = build_components(settings_factory())
    connector = parts.pool.connector
    assert isinstance(connector, Connector)
    with pytest.raises(RuntimeError, match="already bound"):
        connector.bind_relay(Relay(parts.pool))


async def test_opening_before_the_relay_is_bound_is_a_wiring_error(harness: AppHarness) -> None:
    parts = harness.parts
    unbound = Connector(parts.settings, parts.registry, parts.rediscovery, Subscriptions())
    with pytest.raises(RuntimeError, match="bind_relay"):
        async with unbound(KEY):
            pass


async def test_a_deleted_server_does_not_open(harness: AppHarness) -> None:
    with pytest.raises(UpstreamError, match="no longer exists"):
        async with harness.parts.pool.connector(PoolKey("gone", 1, "u1")):
            pass


async def test_upstream_notifications_reach_rediscovery_and_subscribers(harness: AppHarness) -> None:
    parts = harness.parts
    rediscovery, subscriptions = RecordingRediscovery(), RecordingSubscriptions()
    connector = Connector(parts.settings, parts.registry, rediscovery, subscriptions)  # type: ignore[arg-type]
    handle = connector.message_handler(KEY)
    for changed in (
        types.ToolListChangedNotification(),
        types.PromptListChangedNotification(),
        types.ResourceListChangedNotification(),
    ):
        await handle(changed)
    await handle(
        types.ResourceUpdatedNotification(params=types.ResourceUpdatedNotificationParams(uri="file:///a"))
    )
    await handle(
        types.LoggingMessageNotification(
            params=types.LoggingMessageNotificationParams(level="info", data="x")
        )
    )
    await handle(RuntimeError("a transport error is dropped"))
    assert rediscovery.triggered == ["s1", "s1", "s1"]
    assert subscriptions.updates == [(KEY, "file:///a")]


def _streams() -> tuple[object, object]:
    send, receive = anyio.create_memory_object_stream[object](1)
    return receive, send


def test_a_pooled_session_reads_what_open_session_added() -> None:
    read, write = _streams()
    plain = PooledSession.of(ClientSession(read, write))  # type: ignore[arg-type]
    assert plain.wire is None and plain.answer_limit is None
    assert plain.trips() == 0 and plain.tripped_since(0) is None

    session = UpstreamSession(read, write)  # type: ignore[arg-type]
    session.answer_limit = AnswerLimit(100)
    pooled = PooledSession.of(session)
    assert pooled.client is session and pooled.answer_limit is session.answer_limit
    before = pooled.trips()
    assert pooled.tripped_since(before) is None
    session.answer_limit.trip()
    assert pooled.trips() == before + 1
    assert pooled.tripped_since(before) is session.answer_limit
