"""Audit events: recording (bounded queue, batched inserts), redaction, detail levels, queries, retention.

`AuditLog.record` is synchronous and never blocks nor raises: a call must not wait for, or fail
because of, the audit. Overflow is counted (`dropped`), and so are batches the database refused
(`failed_writes`); both are exported in `/metrics`. The writer task is owned by the app lifespan and
flushes what is queued when the app stops.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import anyio
from sqlalchemy import delete, tuple_
from sqlmodel import Session, col, select

from scailink_mcp.db import Database
from scailink_mcp.models import AuditEvent, new_id, utcnow
from scailink_mcp.remote.discovery import aware

logger = logging.getLogger(__name__)

REDACTED = "[REDACTED]"
_SECRET_KEY = re.compile(
    r"pass(word|wd|phrase)?|secret|token|api[-_]?key|apikey|authorization|auth|credential|private[-_]?key|"
    r"cookie|session[-_]?id|bearer|signature",
    re.IGNORECASE,
)


def redact(value: Any, depth: int = 0) -> Any:
    """A copy of `value` with the values of secret-looking keys replaced, at any depth."""
    if depth > 20:
        return REDACTED
    if isinstance(value, dict):
        return {
            k: (REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) else redact(v, depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v, depth + 1) for v in value]
    return value


@dataclass
class AuditRecord:
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
    ts: datetime = field(default_factory=utcnow)

    def row(self) -> AuditEvent:
        detailed = self.detail_level == "metadata"
        return AuditEvent(
            id=new_id(),
            ts=self.ts,
            tenant_id=self.tenant_id,
            user_id=self.user_id,
            event=self.event,
            outcome=self.outcome,
            error_code=self.error_code,
            duration_ms=round(self.duration_ms, 3) if self.duration_ms is not None else None,
            request_id=self.request_id,
            target=self.target[:1024] if detailed and self.target else None,
            arguments=redact(self.arguments) if detailed and isinstance(self.arguments, dict) else None,
        )


class AuditLog:
    def __init__(
        self, db: Database, *, queue_size: int = 10_000, batch_size: int = 200, flush_interval_s: float = 0.5
    ) -> None:
        self.db = db
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self._queue: deque[AuditRecord] = deque()
        self._wake = anyio.Event()
        self.dropped = 0
        self.failed_writes = 0
        self.written = 0

    def depth(self) -> int:
        return len(self._queue)

    def record(self, rec: AuditRecord) -> None:
        try:
            if len(self._queue) >= self.queue_size:
                self.dropped += 1
                return
            self._queue.append(rec)
            if len(self._queue) >= self.batch_size:
                self._wake.set()
        except Exception:  # never let the audit fail a call
            self.dropped += 1

    async def flush(self) -> int:
        """Write everything queued now, one transaction per batch; a refused batch is counted and dropped."""
        written = 0
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
            rows = [rec.row() for rec in batch]

            def insert(session: Session, rows: list[AuditEvent] = rows) -> None:
                session.add_all(rows)
                session.commit()

            try:
                await self.db.run(insert)
                written += len(rows)
            except Exception as exc:
                self.failed_writes += len(rows)
                logger.warning(
                    "audit batch not written", extra={"rows": len(rows), "error": type(exc).__name__}
                )
        self.written += written
        return written

    async def run(self) -> None:
        """Owned by the app lifespan; flushes what is left when cancelled (bounded)."""
        try:
            while True:
                with anyio.move_on_after(self.flush_interval_s):
                    await self._wake.wait()
                self._wake = anyio.Event()
                await self.flush()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
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
        after: tuple[str, str] | None = None,
    ) -> tuple[list[dict[str, Any]], tuple[str, str] | None]:
        """Newest first, keyset-paginated on (ts, id)."""

        def run(session: Session) -> tuple[list[dict[str, Any]], tuple[str, str] | None]:
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
                q = q.where(col(AuditEvent.ts) >= since)
            if until is not None:
                q = q.where(col(AuditEvent.ts) < until)
            if after is not None:
                q = q.where(
                    tuple_(col(AuditEvent.ts), col(AuditEvent.id))
                    < tuple_(datetime.fromisoformat(after[0]), after[1])
                )
            rows = session.exec(
                q.order_by(col(AuditEvent.ts).desc(), col(AuditEvent.id).desc()).limit(limit + 1)
            ).all()
            items = [_dump(r) for r in rows[:limit]]
            last = rows[limit - 1] if len(rows) > limit else None
            return items, (aware(last.ts).isoformat(), last.id) if last else None

        return await self.db.run(run)

    async def prune(self, older_than: datetime) -> int:
        def run(session: Session) -> int:
            result = session.execute(delete(AuditEvent).where(col(AuditEvent.ts) < older_than))
            session.commit()
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

        return await self.db.run(run)

    async def run_pruner(self, retention_s: float, interval_s: float = 3600.0) -> None:
        """Owned by the app lifespan: deletes events older than the retention, hourly."""
        while True:
            try:
                await self.prune(utcnow() - timedelta(seconds=retention_s))
            except Exception:
                logger.exception("audit pruning failed")
            await anyio.sleep(interval_s)


def _dump(row: AuditEvent) -> dict[str, Any]:
    return {
        "id": row.id,
        "ts": aware(row.ts).isoformat(),
        "tenant_id": row.tenant_id,
        "user_id": row.user_id,
        "event": row.event,
        "outcome": row.outcome,
        "error_code": row.error_code,
        "duration_ms": row.duration_ms,
        "request_id": row.request_id,
        "target": row.target,
        "arguments": row.arguments,
    }
