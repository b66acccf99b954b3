"""Discovery: what an upstream offers (tools, resources, resource templates, prompts).

`discover` talks to the upstream (following pagination, bounded in time; each item kept as the upstream
sent it, `raw_listing.py`); `store_discovery` upserts one
capability row per (server, kind, name) with `last_seen_at` and evicts rows unseen for longer than the
retention. The catalog shows only the rows the latest successful discovery saw
(`last_seen_at >= server.last_discovery_at`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
from mcp.client.session import ClientSession
from sqlmodel import Session, col, delete, select

from scailink_mcp.models import Capability, RemoteServer
from scailink_mcp.raw_listing import list_raw, text_of
from scailink_mcp.relay import unrelayed_options
from scailink_mcp.remote.upstream import Network, UpstreamTarget, open_session

KINDS = ("tool", "resource", "resource_template", "prompt")


@dataclass(frozen=True)
class DiscoveredItem:
    kind: str
    name: str
    description: str | None
    payload: dict[str, Any]


@dataclass
class DiscoveryResult:
    items: list[DiscoveredItem] = field(default_factory=list)

    def names(self, kind: str) -> list[str]:
        return [item.name for item in self.items if item.kind == kind]


def aware(ts: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored timestamp is UTC."""
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


async def list_capabilities(session: ClientSession) -> DiscoveryResult:
    """List everything the upstream advertises; kinds it does not advertise are skipped."""
    caps = session.server_capabilities
    result = DiscoveryResult()
    if caps is None or caps.tools is not None:
        for tool in await list_raw(session, "tools/list"):
            result.items.append(DiscoveredItem("tool", str(tool["name"]), text_of(tool, "description"), tool))
    if caps is not None and caps.resources is not None:
        for res in await list_raw(session, "resources/list"):
            result.items.append(DiscoveredItem("resource", str(res["uri"]), text_of(res, "description"), res))
        for tpl in await list_raw(session, "resources/templates/list"):
            name = str(tpl["uriTemplate"])
            result.items.append(DiscoveredItem("resource_template", name, text_of(tpl, "description"), tpl))
    if caps is not None and caps.prompts is not None:
        for prompt in await list_raw(session, "prompts/list"):
            result.items.append(
                DiscoveredItem("prompt", str(prompt["name"]), text_of(prompt, "description"), prompt)
            )
    return result


async def discover(
    target: UpstreamTarget,
    allowed: Sequence[Network],
    *,
    connect_timeout: float,
    total_timeout: float,
    max_answer_bytes: int,
) -> DiscoveryResult:
    """Connect over a fresh session and list everything, all within `total_timeout` seconds.

    Each answer (one page of a listing) is read up to `max_answer_bytes`; a larger one stops the
    read there and raises `errors.ResultTooLarge`.
    """
    with anyio.fail_after(total_timeout):
        async with open_session(
            target,
            allowed,
            connect_timeout=connect_timeout,
            read_timeout=total_timeout,
            max_event_bytes=max_answer_bytes,
            session_options=unrelayed_options(),  # the capabilities a pooled session declares
        ) as session:
            return await list_capabilities(session)


def visible_capabilities(session: Session, server: RemoteServer) -> list[Capability]:
    """The rows the latest successful discovery saw."""
    if server.last_discovery_at is None:
        return []
    rows = session.exec(
        select(Capability)
        .where(Capability.server_id == server.id)
        .order_by(col(Capability.kind), col(Capability.name))
    ).all()
    seen_at = aware(server.last_discovery_at)
    return [row for row in rows if aware(row.last_seen_at) >= seen_at]


def store_discovery(
    session: Session, server: RemoteServer, result: DiscoveryResult, *, now: datetime, retention_s: float
) -> bool:
    """Upsert the discovered rows, evict stale ones, stamp the server; True if the visible set changed.

    The caller commits.
    """
    before = {(c.kind, c.name): c.payload for c in visible_capabilities(session, server)}
    existing = {
        (row.kind, row.name): row
        for row in session.exec(select(Capability).where(Capability.server_id == server.id)).all()
    }
    for item in result.items:
        row = existing.get((item.kind, item.name))
        if row is None:
            row = Capability(server_id=server.id, kind=item.kind, name=item.name)
            existing[(item.kind, item.name)] = row
        row.description = item.description
        row.payload = item.payload
        row.last_seen_at = now
        session.add(row)
    session.flush()
    session.execute(
        delete(Capability).where(
            col(Capability.server_id) == server.id,
            col(Capability.last_seen_at) < now - timedelta(seconds=retention_s),
        ),
        # SQLite hands back naive datetimes; evaluating the filter in Python would compare them to `now`.
        execution_options={"synchronize_session": False},
    )
    server.last_discovery_at = now
    session.add(server)
    after = {(item.kind, item.name): item.payload for item in result.items}
    return before != after
