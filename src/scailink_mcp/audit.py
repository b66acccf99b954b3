"""Audit events: recording (bounded queue, batched inserts), redaction, detail levels, queries, retention.

`AuditLog.record` is synchronous and never blocks nor raises: a call must not wait for, or fail
because of, the audit. It only stamps the time and appends to a bounded queue; redaction, truncation
and serialisation happen in the writer, off the caller's path. Overflow is counted (`dropped`), and so
are events in batches the database refused (`failed_writes`); both are exported in `/metrics`.

The writer (`run`) and the retention loop (`run_pruner`) are owned by the app lifespan; `run` flushes
what is queued when it is cancelled, within `drain_timeout_s`. Tests step them with `flush()`,
`prune_round()` and an injected clock instead of sleeping. With several replicas on one database, a
pruning round takes the lease `audit-prune` (`leases.py`) first, so the retention is applied once per
interval in the cluster (by the replica that keeps renewing it), not by every replica.

This module must not be called from a worker thread (`record` wakes the writer through an anyio event)
and must not raise into a caller of `record`.
"""

from __future__ import annotations

import json
import logging
import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypedDict, cast

import anyio
import sqlalchemy as sa
from sqlalchemy import delete, tuple_
from sqlmodel import Session, col, select

from scailink_mcp.db import Database
from scailink_mcp.leases import Lease
from scailink_mcp.models import AuditEvent, new_id, utcnow

logger = logging.getLogger(__name__)

PRUNE_LEASE = "audit-prune"
REDACTED = "[REDACTED]"
OUTCOMES = ("ok", "error", "denied")
DETAIL_LEVELS = ("metadata", "off")

# ---- redaction (pure) -------------------------------------------------------------------------------

# A key is split into lower-case words (separators and camelCase), so `X-Api-Key`, `apiKey` and
# `api_key` look alike while `author`, `passenger` or `keyword` do not look like secrets.
_WORDS = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
_SECRET_WORDS = frozenset(
    {
        "auth", "authorization", "bearer", "cookie", "cookies", "credential", "credentials", "jwt",
        "pass", "passphrase", "passwd", "password", "passwords", "pwd", "secret", "secrets", "session",
        "sessions", "signature", "token", "tokens",
    }
)  # fmt: skip
# Stems that also give a single run-together word away (`clientsecret`, `xapikey`, `setcookie`).
_SECRET_STEMS = (
    "apikey", "authorization", "cookie", "credential", "passphrase", "passwd", "password", "privatekey",
    "secret", "sessionid",
)  # fmt: skip
# `<qualifier> key` is a secret (`api_key`, `private-key`, `signingKey`); `key` alone or `keyword` is not.
_KEY_QUALIFIERS = frozenset(
    {"access", "api", "client", "encryption", "master", "private", "secret", "signing"}
)
# `max_tokens`, `token_count`: a number of tokens, not a token.
_COUNT_WORDS = frozenset({"budget", "count", "limit", "max", "min", "num", "remaining", "usage", "used"})
# Values that are credentials whatever their key is called: a bearer header, a JWT.
_SECRET_VALUE = re.compile(r"^\s*bearer\s+[\w\-.~+/]+=*\s*$|^eyJ[\w-]{4,}\.eyJ[\w-]{4,}\.", re.IGNORECASE)
_MAX_DEPTH = 20


def is_secret_key(key: str) -> bool:
    """Whether the value under `key` must not be stored. Errs towards redacting."""
    words = [w.lower() for w in _WORDS.findall(key)]
    hits: set[str] = set()
    for i, word in enumerate(words):
        if word in _SECRET_WORDS or word.endswith("token") or word.endswith("tokens"):
            hits.add(word)
        else:
            qualified_key = word == "key" and i > 0 and words[i - 1] in _KEY_QUALIFIERS
            if qualified_key or any(stem in word for stem in _SECRET_STEMS):
                return True
    if not hits:
        return False
    only_token_counts = hits <= {"token", "tokens"} and not _COUNT_WORDS.isdisjoint(words)
    return not only_token_counts


def redact(value: Any, depth: int = 0) -> Any:
    """A copy of `value` with the values of secret-looking keys (and credential-looking strings)
    replaced by `[REDACTED]`, at any depth. The caller's object is not modified."""
    if depth > _MAX_DEPTH:
        return REDACTED
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if isinstance(k, str) and is_secret_key(k) else redact(v, depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v, depth + 1) for v in value]
    if isinstance(value, str) and _SECRET_VALUE.match(value):
        return REDACTED
    return value


# ---- records -----------------------------------------------------------------------------------------


@dataclass
class AuditRecord:
    """What a caller hands to `AuditLog.record`; `ts` is stamped by the log's clock when left unset."""

    tenant_id: str
    user_id: str
    event: str
    outcome: str  # ok | error | denied
    error_code: str | None = None
    duration_ms: float | None = None
    request_id: str | None = None
    target: str | None = None
    arguments: Any = None
    detail_level: str = "metadata"  # metadata | off
    ts: datetime | None = None

    def values(self, max_argument_bytes: int = 16 * 1024) -> dict[str, Any]:
        """The table row's column values: redacted, truncated to the column sizes (one oversized value
        must not make the database refuse a whole batch), and at level `off` only the skeleton.

        A plain dict, inserted in one executemany per batch: building an `AuditEvent` model per call
        (SQLModel's validation and instrumented attributes) was ~5 % of ScaiLink's CPU per warm call."""
        detailed = self.detail_level == "metadata"
        return dict(
            id=new_id(),
            ts=_utc(self.ts or utcnow()),
            tenant_id=_text(self.tenant_id, 128),
            user_id=_text(self.user_id, 128),
            event=_text(self.event, 64),
            outcome=_text(self.outcome, 16),
            error_code=_text(self.error_code, 64) if self.error_code else None,
            duration_ms=round(self.duration_ms, 3) if self.duration_ms is not None else None,
            request_id=_text(self.request_id, 128) if self.request_id else None,
            target=_text(self.target, 1024) if detailed and self.target else None,
            arguments=_stored_arguments(self.arguments, max_argument_bytes) if detailed else None,
        )


def _text(value: str, size: int) -> str:
    """Truncated to the column, without NUL: PostgreSQL text cannot hold it, and one such value would
    make the database refuse the whole batch (every other event in it lost)."""
    return value.replace("\x00", "\ufffd")[:size]


def _stored_arguments(arguments: Any, max_bytes: int) -> dict[str, Any] | None:
    """Redacted, JSON-safe, and at most `max_bytes` once serialised (else a marker with the size)."""
    if not isinstance(arguments, Mapping):
        return None
    try:
        text = json.dumps(redact(arguments), default=str, ensure_ascii=False)
    except (TypeError, ValueError):  # never let one odd value reach (and sink) the batch
        return {"_unserializable": True}
    text = text.replace("\\u0000", "\\ufffd")  # PostgreSQL JSON(B) refuses NUL escapes too
    size = len(text.encode())
    if size > max_bytes:
        return {"_truncated": True, "_bytes": size}
    stored: dict[str, Any] = json.loads(text)
    return stored


class AuditEntry(TypedDict):
    """One event as the audit API returns it."""

    id: str
    ts: str
    tenant_id: str
    user_id: str
    event: str
    outcome: str
    error_code: str | None
    duration_ms: float | None
    request_id: str | None
    target: str | None
    arguments: dict[str, Any] | None


Cursor = tuple[datetime, str]


def _utc(ts: datetime) -> datetime:
    """Stored times are UTC; SQLite and MySQL keep no offset, so every bound is converted first."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _entry(row: AuditEvent) -> AuditEntry:
    """The row's columns (`AuditEntry` names them one for one), with its time in UTC ISO 8601."""
    return cast("AuditEntry", row.model_dump() | {"ts": _utc(row.ts).isoformat()})


# ---- the log -----------------------------------------------------------------------------------------


class AuditLog:
    def __init__(
        self,
        db: Database,
        *,
        queue_size: int = 10_000,
        batch_size: int = 200,
        flush_interval_s: float = 0.5,
        drain_timeout_s: float = 5.0,
        max_argument_bytes: int = 16 * 1024,
        prune_chunk: int = 5_000,
        clock: Callable[[], datetime] = utcnow,
        lease: Lease | None = None,
    ) -> None:
        self.db = db
        self.lease = lease or Lease()
        self.queue_size = queue_size
        self.batch_size = max(1, batch_size)
        self.flush_interval_s = flush_interval_s
        self.drain_timeout_s = drain_timeout_s
        self.max_argument_bytes = max_argument_bytes
        self.prune_chunk = max(1, prune_chunk)
        self._clock = clock
        self._queue: deque[AuditRecord] = deque()
        self._wake = anyio.Event()
        self.dropped = 0
        self.failed_writes = 0  # events (not batches) the database refused
        self.written = 0

    def depth(self) -> int:
        return len(self._queue)

    def record(self, rec: AuditRecord) -> None:
        """Queue one event. Never blocks, never raises; a full queue drops it and counts it."""
        try:
            if len(self._queue) >= self.queue_size:
                self.dropped += 1
                return
            if rec.ts is None:
                rec.ts = self._clock()
            self._queue.append(rec)
            if len(self._queue) >= self.batch_size:
                self._wake.set()
        except Exception:  # a broken clock, say: never let the audit fail a call
            self.dropped += 1

    async def flush(self) -> int:
        """Write everything queued now, one transaction per batch; a refused batch is counted and
        dropped. Returns how many events were written."""
        written = 0
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
            try:
                rows = [rec.values(self.max_argument_bytes) for rec in batch]

                def insert(session: Session, rows: list[dict[str, Any]] = rows) -> None:
                    session.execute(sa.insert(AuditEvent), rows)
                    session.commit()

                await self.db.run(insert)
            except anyio.get_cancelled_exc_class():
                # Cancelled before a worker thread took the batch (a shutdown while the thread pool
                # is busy): back at the head of the queue, so the final drain writes it.
                self._queue.extendleft(reversed(batch))
                raise
            except Exception as exc:
                self.failed_writes += len(batch)
                logger.warning(
                    "audit batch not written", extra={"rows": len(batch), "error": type(exc).__name__}
                )
            else:
                written += len(batch)
                self.written += len(batch)
        return written

    async def run(self) -> None:
        """Owned by the app lifespan: writes as soon as a batch is full, or every `flush_interval_s`;
        when cancelled, flushes what is left within `drain_timeout_s`."""
        try:
            while True:
                # A new event before looking at the queue: a `record` in between is not missed.
                self._wake = anyio.Event()
                if len(self._queue) < self.batch_size:
                    with anyio.move_on_after(self.flush_interval_s):
                        await self._wake.wait()
                await self.flush()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.drain_timeout_s):
                await self.flush()

    async def query(
        self,
        tenant_id: str,
        *,
        user_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        event: str | None = None,
        outcome: str | None = None,
        target: str | None = None,
        limit: int = 50,
        after: Cursor | None = None,
    ) -> tuple[list[AuditEntry], Cursor | None]:
        """One tenant's events, newest first, keyset-paginated on (ts, id). `since` is inclusive,
        `until` exclusive. `after` is the cursor a previous page returned."""

        def run(session: Session) -> tuple[list[AuditEntry], Cursor | None]:
            q = select(AuditEvent).where(col(AuditEvent.tenant_id) == tenant_id)
            for column, value in (
                (AuditEvent.user_id, user_id),
                (AuditEvent.event, event),
                (AuditEvent.outcome, outcome),
                (AuditEvent.target, target),
            ):
                if value is not None:
                    q = q.where(col(column) == value)
            if since is not None:
                q = q.where(col(AuditEvent.ts) >= _utc(since))
            if until is not None:
                q = q.where(col(AuditEvent.ts) < _utc(until))
            if after is not None:
                q = q.where(tuple_(col(AuditEvent.ts), col(AuditEvent.id)) < tuple_(_utc(after[0]), after[1]))
            rows = session.exec(
                q.order_by(col(AuditEvent.ts).desc(), col(AuditEvent.id).desc()).limit(limit + 1)
            ).all()
            last = rows[limit - 1] if len(rows) > limit else None
            return [_entry(r) for r in rows[:limit]], (_utc(last.ts), last.id) if last else None

        return await self.db.run(run)

    async def prune(self, older_than: datetime) -> int:
        """Delete events before `older_than`, `prune_chunk` rows per transaction (one long delete
        would hold SQLite's write lock against the writer). Returns how many were deleted."""
        cutoff = _utc(older_than)

        def chunk(session: Session) -> int:
            # Ids first, then delete them: MySQL refuses LIMIT inside an IN subquery.
            ids = session.exec(
                select(AuditEvent.id).where(col(AuditEvent.ts) < cutoff).limit(self.prune_chunk)
            ).all()
            if ids:
                session.execute(delete(AuditEvent).where(col(AuditEvent.id).in_(ids)))
                session.commit()
            return len(ids)

        total = 0
        while True:
            deleted = await self.db.run(chunk)
            total += deleted
            if deleted < self.prune_chunk:
                return total

    async def prune_expired(self, retention_s: float) -> int:
        """One step of the retention loop: delete what is older than `retention_s` by the log's clock."""
        return await self.prune(self._clock() - timedelta(seconds=retention_s))

    async def prune_round(self, retention_s: float, interval_s: float) -> int | None:
        """One round of the retention loop: how many events were deleted, or None when another replica
        holds the lease (or Redis does not answer: skipped, the next round tries again). The lease
        lives two intervals: longer than the holder's gap between rounds, so it keeps pruning."""
        if not await self.lease.acquire(PRUNE_LEASE, 2 * interval_s):
            return None
        return await self.prune_expired(retention_s)

    async def run_pruner(self, retention_s: float, interval_s: float = 3600.0) -> None:
        """Owned by the app lifespan: applies the retention now and then every `interval_s`."""
        while True:
            try:
                deleted = await self.prune_round(retention_s, interval_s)
                if deleted:
                    logger.info("audit events pruned", extra={"rows": deleted})
            except Exception as exc:
                logger.warning("audit pruning failed", extra={"error": type(exc).__name__})
            await anyio.sleep(interval_s)
