"""Resource subscriptions relayed through ScaiLink.

A downstream `resources/subscribe` of a `scailink://` URI subscribes the caller's pooled upstream
session to the upstream URI (once per upstream session, however many downstream sessions ask, and
again whenever the pool reopens that session);
the upstream's `notifications/resources/updated` is sent to each subscribed downstream connection
under the public URI. Connections are held weakly: a closed MCP session drops out by itself.

It also keeps the other thing a reopened upstream session must be told again: the log level a
downstream `logging/setLevel` asked for, per (server, user) (the last one asked wins).
"""

from __future__ import annotations

import logging
import weakref

import mcp_types as types
from mcp.server.connection import Connection

from scailink_mcp.remote.pool import PoolKey

logger = logging.getLogger(__name__)

Key = tuple[str, str, str]  # (server id, user id, upstream uri)


class Subscriptions:
    def __init__(self) -> None:
        self._subs: dict[Key, weakref.WeakKeyDictionary[Connection, str]] = {}
        self._levels: dict[tuple[str, str], types.LoggingLevel] = {}

    def set_level(self, server_id: str, user_id: str, level: types.LoggingLevel) -> None:
        self._levels[(server_id, user_id)] = level

    def level_for(self, pool_key: PoolKey) -> types.LoggingLevel | None:
        """The log level to set on a (re)opened session of this (server, user), if one was asked."""
        return self._levels.get((pool_key.server_id, pool_key.user_id))

    @staticmethod
    def key(pool_key: PoolKey, upstream_uri: str) -> Key:
        return (pool_key.server_id, pool_key.user_id, upstream_uri)

    def add(self, pool_key: PoolKey, upstream_uri: str, connection: Connection, public_uri: str) -> bool:
        """Record it; True when this is the first subscriber (the upstream must be subscribed)."""
        subscribers = self._subs.setdefault(self.key(pool_key, upstream_uri), weakref.WeakKeyDictionary())
        first = len(subscribers) == 0
        subscribers[connection] = public_uri
        return first

    def remove(self, pool_key: PoolKey, upstream_uri: str, connection: Connection) -> bool:
        """Forget it; True when nobody is left (the upstream may be unsubscribed)."""
        key = self.key(pool_key, upstream_uri)
        subscribers = self._subs.get(key)
        if subscribers is None:
            return False
        subscribers.pop(connection, None)
        if len(subscribers) == 0:
            del self._subs[key]
            return True
        return False

    def holds(self, connection: Connection) -> bool:
        """The connection is subscribed to something (it is not parked: `session_park.py`)."""
        return any(connection in subscribers for subscribers in self._subs.values())

    def uris_for(self, pool_key: PoolKey) -> list[str]:
        """Upstream URIs someone is subscribed to through this (server, user) session."""
        return [
            uri
            for (server_id, user_id, uri), subscribers in self._subs.items()
            if server_id == pool_key.server_id and user_id == pool_key.user_id and len(subscribers)
        ]

    async def updated(self, pool_key: PoolKey, upstream_uri: str) -> int:
        """The upstream says `upstream_uri` changed: tell every subscribed downstream connection."""
        subscribers = self._subs.get(self.key(pool_key, upstream_uri))
        sent = 0
        for connection, public_uri in list((subscribers or {}).items()):
            try:
                await connection.send_resource_updated(public_uri)
                sent += 1
            except Exception as exc:
                logger.debug("resource update not delivered", extra={"error": type(exc).__name__})
        return sent
