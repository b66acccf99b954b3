"""Parking idle handshake-era MCP sessions (issue 14): an idle session keeps a small record, not the
SDK's machinery.

Why: an idle Streamable HTTP session cost ~49 KiB of RSS, nearly all in the SDK's per-session machinery
(its transport, a task group and its tasks, memory streams, the dispatcher and runner, pydantic models).
After `mcp_park_idle_s` without a request and with nothing open (no GET stream, no request in flight:
`sdk_sessions.SessionTable.park` decides with the SDK's own idle bookkeeping), the machinery is torn
down and only the record of the handshake stays: the one `mcp_sessions.SharedSessions` saves at
`initialize` (the principal, the credential the SDK checks, the client's `initialize` params). A later
request revives the session transparently on the path that revives a session created on another
replica (`sdk_sessions.revive`): the SDK serves it as its own again, owner check included.

- Without Redis the records live here (`LocalSessions`); with Redis they are its keys
  (`mcp_sessions.SessionStore`), so parking there only ends this replica's copy.
- The rules stay the SDK's: an unknown id, or another credential's, gets its 404; a `DELETE`d session
  stays gone (its record is dropped); a parked session expires when the SDK would have expired it
  (`mcp_session_idle_s` after its last request), its record with it.
- Never parked: a session with an open GET stream or a request in flight (list_changed and the
  client's back-channel travel there), and one that holds resource subscriptions or a pending URL
  elicitation (`pinned`: they are keyed on the live connection). A parked session hears no
  list_changed, as an unparked one without a GET stream does not (the SDK drops what has no stream);
  revived, it is tracked again from the catalog as it is then.
- The per-principal cap counts parked sessions (`trim`, from the guard): parked ones are dropped first;
  `mcp_max_sessions` counts them too (`SharedSessions` answers the SDK's 503 when held + parked reach it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
from mcp.server.auth.middleware.bearer_auth import AuthorizationContext
from mcp.server.connection import Connection
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

from scailink_mcp.mcp_sessions import Store
from scailink_mcp.metrics import Metrics
from scailink_mcp.sdk_sessions import SessionTable

logger = logging.getLogger(__name__)

Owner = tuple[str, str | None, str | None]
Key = tuple[str, str]  # (endpoint, session id)
Trim = Callable[[AuthorizationContext, int], int]
Settled = Callable[[str], Awaitable[None]]


def _owner(context: Any) -> Owner | None:
    if not isinstance(context, dict):
        return None
    return str(context.get("client_id")), context.get("issuer"), context.get("subject")


@dataclass(slots=True)
class _Record:
    state: str  # the JSON of what `SharedSessions` saved at `initialize`
    owner: Owner | None
    expires: float | None = None  # while parked: when the SDK would have expired it (anyio clock)


class LocalSessions:
    """The session records of this process (`mcp_sessions.Store`) when there is no Redis: saved at
    `initialize`, revivable only while parked, dropped when the session ends."""

    shared = False

    def __init__(self) -> None:
        self._records: dict[Key, _Record] = {}
        self._parked: dict[Owner | None, dict[Key, None]] = {}  # per owner, oldest parked first
        self._counts: dict[str, int] = {}  # parked per endpoint

    def register(self, endpoint: str, manager: StreamableHTTPSessionManager) -> None:
        return None

    async def save(self, endpoint: str, session_id: str, state: dict[str, Any]) -> None:
        self._records[(endpoint, session_id)] = _Record(json.dumps(state), _owner(state.get("owner")))

    async def load(self, endpoint: str, session_id: str) -> dict[str, Any] | None:
        key = (endpoint, session_id)
        record = self._records.get(key)
        if record is None or record.expires is None:
            return None  # unknown, or ending in the SDK (not parked): nothing to revive
        if anyio.current_time() >= record.expires:
            self._drop(key)
            return None
        state: dict[str, Any] = json.loads(record.state)
        return state

    async def touch(self, endpoint: str, session_id: str) -> None:
        return None

    async def end(self, endpoint: str, session_id: str) -> None:
        self._drop((endpoint, session_id))

    def park(self, endpoint: str, session_id: str, expires_in: float) -> bool:
        key = (endpoint, session_id)
        record = self._records.get(key)
        if record is None:
            return False  # no record to revive it from: it keeps running
        record.expires = anyio.current_time() + expires_in
        keys = self._parked.setdefault(record.owner, {})
        if key not in keys:
            keys[key] = None
            self._counts[endpoint] = self._counts.get(endpoint, 0) + 1
        return True

    def revived(self, endpoint: str, session_id: str) -> None:
        key = (endpoint, session_id)
        record = self._records.get(key)
        if record is not None and record.expires is not None:
            record.expires = None
            self._unpark(key, record.owner)

    def ended(self, endpoint: str, session_id: str) -> None:
        """The SDK ended the session (DELETE, idle, evicted, crashed, shutdown), not parked."""
        record = self._records.get((endpoint, session_id))
        if record is not None and record.expires is None:
            del self._records[(endpoint, session_id)]

    def trim(self, endpoint: str, owner: AuthorizationContext, keep: int) -> int:
        """Drop `owner`'s oldest parked sessions of `endpoint` until at most `keep` remain."""
        parked = [key for key in self._parked.get(_owner(dict(owner)), {}) if key[0] == endpoint]
        dropped = parked[: max(0, len(parked) - keep)]
        for key in dropped:
            self._drop(key)
        return len(dropped)

    def parked_count(self, endpoint: str) -> int:
        return self._counts.get(endpoint, 0)

    def prune(self) -> int:
        """Drop the parked records past their expiry."""
        now = anyio.current_time()
        expired = [
            key
            for keys in self._parked.values()
            for key in keys
            if (record := self._records.get(key)) is None or (record.expires or 0.0) <= now
        ]
        for key in expired:
            self._drop(key)
        return len(expired)

    def __len__(self) -> int:
        """The parked sessions."""
        return sum(self._counts.values())

    def _drop(self, key: Key) -> None:
        record = self._records.pop(key, None)
        if record is not None:
            self._unpark(key, record.owner)

    def _unpark(self, key: Key, owner: Owner | None) -> None:
        keys = self._parked.get(owner)
        if keys is not None and key in keys:
            del keys[key]
            self._counts[key[0]] -= 1
            if not keys:
                del self._parked[owner]


class Parking:
    """Parks the idle sessions of each endpoint's table (its `run` is owned by the app lifespan)."""

    def __init__(
        self,
        store: Store,
        idle_s: float,
        metrics: Metrics,
        *,
        pinned: Sequence[Callable[[Connection], bool]],
    ) -> None:
        self.store = store
        self.idle_s = idle_s
        self.pinned = pinned
        self.interval_s = max(0.1, min(idle_s / 2, 5.0))
        self.tables: dict[str, SessionTable] = {}
        self.parked = 0  # sessions parked so far (the `scailink_mcp_parkings` gauge)
        metrics.gauge("scailink_mcp_parkings", "Idle MCP sessions parked so far", lambda: self.parked)
        local = store if isinstance(store, LocalSessions) else None
        count = (lambda: len(local)) if local is not None else (lambda: 0)
        metrics.gauge("scailink_mcp_sessions_parked", "MCP sessions parked in this process", count)

    def add(self, endpoint: str, table: SessionTable) -> tuple[Store, str, Settled]:
        """Park the sessions of `table` (bound to its manager); what `SharedSessions` revives with: the
        store, the endpoint, and the wait for a parked session's old copy to be gone."""
        self.tables[endpoint] = table
        table.on_ended = partial(self.store.ended, endpoint)
        return self.store, endpoint, table.settled

    def trim_for(self, manager: StreamableHTTPSessionManager | None) -> Trim | None:
        """The per-principal cap's trim of `manager`'s parked sessions (`mcp_guard.McpGuard`)."""
        for endpoint, table in self.tables.items():
            if manager is not None and table.manager is manager:
                return partial(self.store.trim, endpoint)
        return None

    async def run(self) -> None:
        if self.idle_s <= 0:
            return  # parking disabled
        while True:
            await anyio.sleep(self.interval_s)
            try:
                await self.round()
            except Exception:  # a round's failure must not end parking for the process's lifetime
                logger.exception("parking idle MCP sessions failed")

    async def round(self) -> int:
        """Park every session idle for `idle_s`; the number parked."""
        if isinstance(self.store, LocalSessions):
            self.store.prune()
        parked = 0
        for endpoint, table in self.tables.items():
            for session_id, connection in table.idle(self.idle_s):
                if any(rule(connection) for rule in self.pinned):
                    continue
                keep = partial(self.store.park, endpoint, session_id)
                if await table.park(session_id, connection, self.idle_s, keep):
                    parked += 1
        self.parked += parked
        return parked
