"""The tenant cap on registered remote servers, race-safe across workers and replicas.

Owns the `tenant_quota` row of a tenant: a conditional UPDATE (`server_count < cap`) inside the
insert's transaction is the cap, so concurrent creates serialize on that row and never overshoot.

Must not: commit (the caller's transaction holds the insert and the count together).
"""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from scailink_mcp.errors import RemoteLimitExceeded
from scailink_mcp.models import TenantQuota


def take_slot(session: Session, tenant_id: str, cap: int) -> None:
    """Count one more server for the tenant, or roll back and raise `RemoteLimitExceeded`."""
    _ensure_quota_row(session, tenant_id)
    bumped = session.execute(
        update(TenantQuota)
        .where(col(TenantQuota.tenant_id) == tenant_id, col(TenantQuota.server_count) < cap)
        .values(server_count=col(TenantQuota.server_count) + 1)
    )
    if bumped.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        raise RemoteLimitExceeded(
            f"tenant already has {cap} remote servers", details={"max_servers_per_tenant": cap}
        )


def release_slot(session: Session, tenant_id: str) -> None:
    """Count one server less (never below zero)."""
    session.execute(
        update(TenantQuota)
        .where(col(TenantQuota.tenant_id) == tenant_id, col(TenantQuota.server_count) > 0)
        .values(server_count=col(TenantQuota.server_count) - 1)
    )


def _ensure_quota_row(session: Session, tenant_id: str) -> None:
    if session.get(TenantQuota, tenant_id) is not None:
        return
    try:
        with session.begin_nested():
            session.add(TenantQuota(tenant_id=tenant_id, server_count=0))
    except IntegrityError:
        pass  # a concurrent create inserted it first
