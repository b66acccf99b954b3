"""Opening the pool's upstream sessions: the one `pool.Opener` of the app (cold path only).

Owns what opening one pooled session involves: load and decrypt the server's target (through the
registry: the one database read and the one decryption of a session's life), `open_session` with
ScaiLink's message handler (an upstream's list_changed re-runs discovery; `resources/updated` goes
to the subscribed downstream connections) and the relay's callbacks (sampling, elicitation, roots
and log messages go to the downstream call in flight), and re-subscribing the resources someone is
subscribed to through that (server, user) when the pool reopens its session.

Must not: be entered outside the pool's owner task of the session (the pool enters and exits it),
nor be on a warm call's path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass, field

import mcp_types as types
from mcp.client.session import ClientSession, IncomingMessage, MessageHandlerFnT
from mcp.shared.exceptions import MCPError

from scailink_mcp.config import Settings
from scailink_mcp.errors import UpstreamError
from scailink_mcp.relay import Relay
from scailink_mcp.remote.health import Rediscovery
from scailink_mcp.remote.pool import PoolKey
from scailink_mcp.remote.registry import Registry
from scailink_mcp.remote.upstream import open_session
from scailink_mcp.subscriptions import Subscriptions

LIST_CHANGED = (
    types.ToolListChangedNotification,
    types.PromptListChangedNotification,
    types.ResourceListChangedNotification,
)


@dataclass(eq=False)
class Connector:
    """Opens the pooled session of a `PoolKey`; the pool calls it (`connector(key)`) in the owner task.

    The relay is the one late binding (`bind_relay`), and that is deliberate: the pool needs its
    opener when it is built, `Relay(pool)` needs the pool (it reads the downstream call in flight on
    a pooled session), and only opening a session needs the relay's callbacks. So the app builds the
    connector, then the pool with it, then the relay over the pool, and binds the relay here before
    anything runs. The other ways out are worse: a `current_relay` callable handed to the relay still
    closes over the pool before it exists (the same cycle, hidden in a lambda), and setting the
    pool's opener late would make the pool's one essential dependency optional. Opening a session
    before `bind_relay` is a wiring bug and raises.
    """

    settings: Settings
    registry: Registry
    rediscovery: Rediscovery
    subscriptions: Subscriptions
    _relay: Relay | None = field(default=None, init=False)

    def bind_relay(self, relay: Relay) -> None:
        """Where the upstream's server-to-client requests go; once, before the pool opens a session."""
        if self._relay is not None:
            raise RuntimeError("the connector's relay is already bound")
        self._relay = relay

    def __call__(self, key: PoolKey) -> AbstractAsyncContextManager[ClientSession]:
        return self._opened(key)

    @asynccontextmanager
    async def _opened(self, key: PoolKey) -> AsyncIterator[ClientSession]:
        if self._relay is None:
            raise RuntimeError("Connector.bind_relay was not called before the pool opened a session")
        registry, settings = self.registry, self.settings
        target = await registry.db.run(lambda s: registry.target_by_id(s, key.server_id, key.user_id))
        if target is None:
            raise UpstreamError("the server no longer exists")
        async with open_session(
            target,
            registry.allowed,
            connect_timeout=settings.discovery_connect_timeout_s,
            read_timeout=settings.call_timeout_max_s,
            message_handler=self.message_handler(key),
            session_options=self._relay.session_options(key),
            max_event_bytes=settings.max_result_bytes,
        ) as session:
            # A reopened session (after an error, the idle TTL, a rotation) keeps its subscriptions
            # (none on a 2026-07-28-only upstream: that era has no resources/subscribe).
            modern = session.discover_result is not None
            for uri in () if modern else self.subscriptions.uris_for(key):
                await session.subscribe_resource(uri)
            level = None if modern else self.subscriptions.level_for(key)
            if level is not None:  # and the log level asked for (an upstream without logging refuses it)
                request = types.SetLevelRequest(params=types.SetLevelRequestParams(level=level))
                with suppress(MCPError):
                    await session.send_request(request, types.EmptyResult)
            yield session

    def message_handler(self, key: PoolKey) -> MessageHandlerFnT:
        """The upstream notifications ScaiLink acts on; the rest are dropped."""

        async def handle(message: IncomingMessage) -> None:
            # An upstream's own list_changed re-runs discovery (in another task: never await a
            # request on the same session from inside its message handler).
            if isinstance(message, LIST_CHANGED):
                self.rediscovery.trigger(key.server_id)
            elif isinstance(message, types.ResourceUpdatedNotification):
                await self.subscriptions.updated(key, str(message.params.uri))

        return handle
