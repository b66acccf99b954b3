"""Dashboard sign-in state: cookie sessions and one-time sign-in tickets, both held in memory.

A session maps a random cookie value to the signed-in token (kept here, never sent back to the
browser), its CSRF token and its expiry, which is the token's own `exp`. Every request re-verifies the
token, so a custom-role change applies at once and an expired token ends the session.

A ticket is a random one-time value standing for a token (the sign-in link `scailink dev` prints): it
works once and expires after `ticket_ttl_s`.

Must not: render, log or return a token to a caller other than the request handler signing in.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

Clock = Callable[[], float]


@dataclass
class WebSession:
    token: str = field(repr=False)
    csrf: str = field(repr=False)
    expires_at: float
    user_id: str
    tenant_id: str
    # One-shot messages shown on the next page (after a POST-redirect-GET).
    flashes: list[tuple[str, str]] = field(default_factory=list)

    def csrf_matches(self, candidate: str | None) -> bool:
        return bool(candidate) and hmac.compare_digest(self.csrf.encode(), str(candidate).encode())

    def flash(self, kind: str, message: str) -> None:
        self.flashes.append((kind, message))

    def take_flashes(self) -> list[tuple[str, str]]:
        taken, self.flashes = self.flashes, []
        return taken


class SessionStore:
    """Sessions by cookie value. Bounded: past `max_sessions`, expired ones go first, then the oldest;
    one user holds at most `max_per_user` (signing in again ends their oldest), so nobody can push
    everyone else out."""

    def __init__(
        self, *, max_sessions: int = 10_000, max_per_user: int = 20, clock: Clock = time.time
    ) -> None:
        self.max_sessions = max_sessions
        self.max_per_user = max_per_user
        self.clock = clock
        self._sessions: dict[str, WebSession] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def create(
        self, token: str, *, expires_at: float, user_id: str, tenant_id: str
    ) -> tuple[str, WebSession]:
        mine = [k for k, v in self._sessions.items() if (v.tenant_id, v.user_id) == (tenant_id, user_id)]
        for sid in mine[: max(0, len(mine) - self.max_per_user + 1)]:
            del self._sessions[sid]
        self._make_room()
        sid = secrets.token_urlsafe(32)
        session = WebSession(
            token=token,
            csrf=secrets.token_urlsafe(32),
            expires_at=expires_at,
            user_id=user_id,
            tenant_id=tenant_id,
        )
        self._sessions[sid] = session
        return sid, session

    def get(self, sid: str | None) -> WebSession | None:
        if not sid:
            return None
        session = self._sessions.get(sid)
        if session is not None and self.clock() >= session.expires_at:
            del self._sessions[sid]
            return None
        return session

    def end(self, sid: str | None) -> None:
        if sid:
            self._sessions.pop(sid, None)

    def _make_room(self) -> None:
        if len(self._sessions) < self.max_sessions:
            return
        now = self.clock()
        for sid in [s for s, v in self._sessions.items() if now >= v.expires_at]:
            del self._sessions[sid]
        while len(self._sessions) >= self.max_sessions:
            del self._sessions[next(iter(self._sessions))]  # dicts keep insertion order: the oldest


class LoginTickets:
    """One-time sign-in tickets: `add` (or `issue`) one for a token, `redeem` it once."""

    def __init__(self, *, ttl_s: float = 600.0, max_tickets: int = 100, clock: Clock = time.time) -> None:
        self.ttl_s = ttl_s
        self.max_tickets = max_tickets
        self.clock = clock
        self._tickets: dict[str, tuple[str, float]] = {}

    def issue(self, token: str) -> str:
        ticket = secrets.token_urlsafe(32)
        self.add(ticket, token)
        return ticket

    def add(self, ticket: str, token: str) -> None:
        now = self.clock()
        for key in [k for k, (_, until) in self._tickets.items() if now >= until]:
            del self._tickets[key]
        while len(self._tickets) >= self.max_tickets:
            del self._tickets[next(iter(self._tickets))]
        self._tickets[ticket] = (token, now + self.ttl_s)

    def redeem(self, ticket: str | None) -> str | None:
        """The token, once; None for an unknown, used or expired ticket."""
        if not ticket:
            return None
        entry = self._tickets.pop(ticket, None)
        if entry is None or self.clock() >= entry[1]:
            return None
        return entry[0]
