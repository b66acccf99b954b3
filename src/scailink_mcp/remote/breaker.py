"""Circuit breakers of upstream calls, scoped so that one user cannot open a circuit for others.

Owns which failures count (`counts_for_breaker`: transport failures and timeouts only) and the
breakers themselves (`CircuitBreakers`). Each (server, user) has its own: `failures` of that user's
calls failing within `window_s` make that user's calls fail fast for `open_s`. So a user whose calls
time out or break (whatever the cause, their own arguments included) only blocks themselves. A real
outage shows as failures of many users: when the server's failures within the window reach `failures`
and come from at least `min_users` distinct users, the server's circuit opens for everyone at once.
One user alone can never open it (unless `min_users` is 1). A success clears the caller's own
breaker and the server's count.

Must not: sleep or run a task (time is the injected clock; the pool's reaper calls `prune` with it), or hold
a breaker with nothing left in its window (memory stays bounded by the users failing now).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import mcp_types as types
from mcp.shared.exceptions import MCPError

from scailink_mcp.errors import ProtocolError, ResultTooLarge, UpstreamError

# The SDK transports resolve a request whose stream broke with this code (`SSE stream failed`, `SSE
# stream ended without a response`, reconnection exhausted): a transport failure, not an answer.
SDK_CONNECTION_CLOSED = types.CONNECTION_CLOSED

# (server id, user id): that user's breaker; (server id, None): the server's, for everyone.
BreakerName = tuple[str, str | None]


def counts_for_breaker(exc: BaseException) -> bool:
    """Whether a failed call counts towards a circuit breaker: transport failures and timeouts only.

    Not counted: a JSON-RPC error the upstream answered (`MCPError`: bad arguments, unknown tool,
    the tool's own failure; it is the caller's, and the upstream is evidently up) and an answer over
    the size limit (`ResultTooLarge`: it depends on the call, not on the upstream's health).
    """
    if isinstance(exc, ResultTooLarge | ProtocolError):  # ProtocolError: an answer, as MCPError is
        return False
    if isinstance(exc, MCPError):
        return exc.error.code == SDK_CONNECTION_CLOSED
    return True


@dataclass
class _Breaker:
    failures: deque[tuple[float, str]] = field(default_factory=deque)  # (time, user id)
    open_until: float = 0.0

    def prune(self, now: float, window_s: float) -> None:
        while self.failures and now - self.failures[0][0] > window_s:
            self.failures.popleft()

    def idle(self, now: float) -> bool:
        return not self.failures and self.open_until <= now


@dataclass(frozen=True)
class BreakerPolicy:
    """When a circuit opens (see the module docstring): `failures` within `window_s` open it for
    `open_s`; the server's own needs them from at least `min_users` distinct users."""

    failures: int = 5
    window_s: float = 60.0
    open_s: float = 30.0
    min_users: int = 3


DEFAULT_POLICY = BreakerPolicy()


class CircuitBreakers:
    """The breakers of every (server, user) and server that failed lately; `len()` counts them."""

    def __init__(
        self, policy: BreakerPolicy = DEFAULT_POLICY, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failures = policy.failures
        self.window_s = policy.window_s
        self.open_s = policy.open_s
        self.min_users = max(1, policy.min_users)
        self.clock = clock
        # Public so that the pool sees with a dict lookup that a call has no breaker (`check` and
        # `success` would do nothing: the warm call's common case) without calling in here; only
        # this class changes it.
        self.active: dict[BreakerName, _Breaker] = {}

    def __len__(self) -> int:
        return len(self.active)

    def check(self, server_id: str, user_id: str) -> None:
        """`UpstreamError` (with `retry_after`) if this user's or the server's circuit is open."""
        now = self.clock()
        for name in ((server_id, user_id), (server_id, None)):
            breaker = self.active.get(name)
            if breaker is not None and breaker.open_until > now:
                raise UpstreamError(
                    "circuit open: the upstream failed repeatedly", retry_after=breaker.open_until - now
                )

    def failure(self, server_id: str, user_id: str) -> None:
        now = self.clock()
        for name in ((server_id, user_id), (server_id, None)):
            breaker = self.active.setdefault(name, _Breaker())
            breaker.failures.append((now, user_id))
            breaker.prune(now, self.window_s)
            users = {user for _, user in breaker.failures}
            needed = 1 if name[1] is not None else self.min_users
            if len(breaker.failures) >= self.failures and len(users) >= needed:
                breaker.open_until = now + self.open_s
                breaker.failures.clear()

    def success(self, server_id: str, user_id: str) -> None:
        now = self.clock()
        for name in ((server_id, user_id), (server_id, None)):
            breaker = self.active.get(name)
            if breaker is not None:
                breaker.failures.clear()
                if breaker.idle(now):
                    del self.active[name]

    def prune(self, now: float) -> None:
        """Forget breakers with nothing left in their window (bounds memory: one per failing user)."""
        for name, breaker in list(self.active.items()):
            breaker.prune(now, self.window_s)
            if breaker.idle(now):
                del self.active[name]

    def is_open(self, server_id: str, user_id: str | None = None) -> bool:
        """Whether calls fail fast: `user_id`'s calls to the server, or (None) some user's or everyone's."""
        now = self.clock()
        return any(
            breaker.open_until > now
            for (sid, uid), breaker in self.active.items()
            if sid == server_id and (user_id is None or uid in (user_id, None))
        )
