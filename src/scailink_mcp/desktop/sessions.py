"""One live desktop session: its device, its catalog, and the answers it owes.

A `DesktopSession` outlives its WebSocket: on disconnect (`detach`) it stays `disconnected` for the
grace period (its tools stay listed, calls wait for a reconnect within their own timeout) and a
`session_init` with `resume_session_id` re-attaches a new socket to it (`attach`). Every request sent
to the device waits on a `Pending` owned by its session; `detach` settles them all, so nothing is left
waiting when a device drops mid-call.

Must not: send frames itself or know the registry of sessions (`connections.py` owns both).
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from mcp.shared.dispatcher import ProgressFnT

from scailink_mcp.desktop.protocol import Capabilities, Progress
from scailink_mcp.errors import UpstreamError

Send = Callable[[str], Awaitable[None]]
Closer = Callable[[int, str], Awaitable[None]]
MAX_IN_FLIGHT = 32


def new_session_id() -> str:
    return "slink_" + secrets.token_urlsafe(16)[:22]


def offers(caps: Capabilities) -> dict[str, Any]:
    """A session's catalog fields from `session_init` (items without a usable key are left out)."""
    return {
        "tools": {t["name"]: t for t in caps.tools},
        "resources": [r for r in caps.resources if isinstance(r.get("uri"), str)],
        "prompts": [p for p in caps.prompts if isinstance(p.get("name"), str)],
        "resource_templates": caps.resource_templates,
    }


@dataclass(eq=False)
class Pending:
    """An answer the device owes one waiter: settled once, with a result or an error. `progress`
    relays the device's `scailink/progress` frames to the caller while it waits."""

    done: anyio.Event = field(default_factory=anyio.Event)
    result: dict[str, Any] | None = None
    error: Exception | None = None
    progress: ProgressFnT | None = None

    def settle(self, result: dict[str, Any] | None = None, error: Exception | None = None) -> None:
        if not self.done.is_set():
            self.result, self.error = result, error
            self.done.set()


@dataclass(eq=False)
class DesktopSession:
    session_id: str
    user_id: str
    tenant_id: str
    device_id: str
    device_name: str
    device_slug: str
    platform: dict[str, Any]
    client_version: str
    audit_detail_level: str
    tools: dict[str, dict[str, Any]] = field(default_factory=dict)
    resources: list[dict[str, Any]] = field(default_factory=list)
    prompts: list[dict[str, Any]] = field(default_factory=list)
    resource_templates: list[dict[str, Any]] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    disconnected_at: float | None = None
    send: Send | None = None
    close: Closer | None = None
    # Set while a socket is attached; None stands for "set" (an idle session holds no event, each
    # ~0.7 KiB with its waiter queue, as `abandoned` and `in_flight` are made on first use).
    connected: anyio.Event | None = field(default_factory=anyio.Event)
    pending: dict[str, Pending] = field(default_factory=dict)
    # Invocations given up on (timeout, cancellation): a late answer to one of these is ignored,
    # not a protocol violation (the device could not know the caller stopped waiting).
    abandoned: deque[str] | None = None
    consents: dict[str, Pending] = field(default_factory=dict)
    approved_for_session: set[str] = field(default_factory=set)
    gate: anyio.Semaphore | None = None  # `in_flight`, made on the first call
    # Several replicas (cluster.py): the worker holding the socket ("" = this one), the fencing epoch
    # of the latest announcement, and for a peer's session its state and calls in flight as announced.
    owner: str = ""
    epoch: int = 0
    peer_state: str = "connected"
    peer_in_flight: int = 0

    @property
    def namespace(self) -> str:
        return f"desktop.{self.user_id}.{self.device_slug}"

    @property
    def local(self) -> bool:
        return not self.owner

    @property
    def state(self) -> str:
        if self.owner:
            return self.peer_state
        return "connected" if self.send is not None else "disconnected"

    @property
    def online(self) -> bool:
        """A socket is attached, here or on the owning replica."""
        return self.state == "connected"

    @property
    def in_flight(self) -> anyio.Semaphore:
        """The bound on this device's calls in flight at once."""
        if self.gate is None:
            self.gate = anyio.Semaphore(MAX_IN_FLIGHT)
        return self.gate

    async def until_connected(self) -> None:
        if self.connected is not None:
            await self.connected.wait()

    def abandon(self, invocation_id: str) -> None:
        if self.abandoned is None:
            self.abandoned = deque(maxlen=1024)
        self.abandoned.append(invocation_id)

    def was_abandoned(self, invocation_id: str) -> bool:
        return self.abandoned is not None and invocation_id in self.abandoned

    def attach(self, send: Send, close: Closer) -> None:
        self.send, self.close = send, close
        self.disconnected_at = None
        if self.connected is not None:
            self.connected.set()  # wakes those waiting for this reconnection
            self.connected = None

    def detach(self, now: float) -> None:
        """The socket is gone: fail what is in flight; keep the session for the grace period."""
        self.send = self.close = None
        self.disconnected_at = now
        self.connected = anyio.Event()
        for pending in list(self.pending.values()):
            pending.settle(error=UpstreamError("the desktop device disconnected during the call"))
        for waiter in list(self.consents.values()):
            waiter.settle(result={"decision": "denied"})

    async def relay_progress(self, frame: Progress, timeout_s: float = 1.0) -> None:
        """A `scailink/progress` frame to the caller of its invocation, if it is still waiting and
        asked for progress. Bounded: a slow caller never holds up the device's receive loop (a
        progress update may be lost, the call is not)."""
        pending = self.pending.get(frame.invocation_id)
        if pending is None or pending.progress is None or pending.done.is_set():
            return
        with anyio.move_on_after(timeout_s):
            await pending.progress(frame.progress, frame.total, frame.message)

    def describe(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "user_id": self.user_id,
            "tenant_id": self.tenant_id,
            "device_id": self.device_id,
            "device_name": self.device_name,
            "device_slug": self.device_slug,
            "platform": self.platform,
            "client_version": self.client_version,
            "state": self.state,
            "tools": sorted(self.tools),
            "in_flight": self.peer_in_flight if self.owner else len(self.pending),
        }

    def record(self) -> dict[str, Any]:
        """What peers need to list this session and route to it (cluster.py), as JSON."""
        return {
            **self.describe(),
            "audit_detail_level": self.audit_detail_level,
            "created_at": self.created_at,
            "tool_items": list(self.tools.values()),
            "resources": self.resources,
            "prompts": self.prompts,
            "resource_templates": self.resource_templates,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], owner: str, epoch: int) -> DesktopSession:
        """A peer's session, as announced by `owner` (no socket here: calls are forwarded)."""
        return cls(
            session_id=str(record["session_id"]),
            user_id=str(record["user_id"]),
            tenant_id=str(record["tenant_id"]),
            device_id=str(record["device_id"]),
            device_name=str(record["device_name"]),
            device_slug=str(record["device_slug"]),
            platform=dict(record.get("platform") or {}),
            client_version=str(record.get("client_version", "")),
            audit_detail_level=str(record.get("audit_detail_level", "metadata")),
            tools={t["name"]: t for t in record.get("tool_items", []) if isinstance(t, dict) and "name" in t},
            resources=list(record.get("resources", [])),
            prompts=list(record.get("prompts", [])),
            resource_templates=list(record.get("resource_templates", [])),
            created_at=float(record.get("created_at", 0.0)),
            owner=owner,
            epoch=epoch,
            peer_state=str(record.get("state", "connected")),
            peer_in_flight=int(record.get("in_flight", 0)),
        )
