"""Live desktop sessions by (tenant, user, device); invocation with timeout; consent; the grace period.

Identity is always (tenant, user): a user id is unique only inside its tenant, so the device lookup,
the per-user connection cap, resume and the tool limits all compare both.

A `DesktopSession` outlives its WebSocket: on disconnect it stays `disconnected` for the grace period
(its tools stay listed, calls wait for a reconnect within their own timeout) and a `session_init`
with `resume_session_id` re-attaches a new socket to it. After the grace period it expires and its
tools leave the catalog. Every pending invocation is a future owned by its session and removed in a
`finally`, so nothing is left behind when a device drops mid-call.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from scailink_mcp.desktop import protocol
from scailink_mcp.errors import ConsentDenied, ToolNotFound, UpstreamError, UpstreamTimeout
from scailink_mcp.events import DesktopCatalogChanged, EventBus
from scailink_mcp.naming import slugify

logger = logging.getLogger(__name__)

Send = Callable[[str], Awaitable[None]]
Closer = Callable[[int, str], Awaitable[None]]
MAX_IN_FLIGHT = 32
CONSENT_META_KEY = "scailink/consent"  # a desktop tool whose `_meta` says "confirm" needs consent per call


def new_session_id() -> str:
    return "slink_" + secrets.token_urlsafe(16)[:22]


@dataclass(frozen=True)
class ToolLimits:
    """Tools one session may hold, and one (tenant, user) across its sessions (connected or in grace)."""

    per_session: int
    per_user: int


@dataclass(eq=False)
class _Pending:
    done: anyio.Event = field(default_factory=anyio.Event)
    result: dict[str, Any] | None = None
    error: Exception | None = None

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
    created_at: float = field(default_factory=time.time)
    disconnected_at: float | None = None
    send: Send | None = None
    close: Closer | None = None
    connected: anyio.Event = field(default_factory=anyio.Event)
    pending: dict[str, _Pending] = field(default_factory=dict)
    # Invocations given up on (timeout, cancellation): a late answer to one of these is ignored,
    # not a protocol violation (the device could not know the caller stopped waiting).
    abandoned: deque[str] = field(default_factory=lambda: deque(maxlen=1024))
    consents: dict[str, _Pending] = field(default_factory=dict)
    approved_for_session: set[str] = field(default_factory=set)
    in_flight: anyio.Semaphore = field(default_factory=lambda: anyio.Semaphore(MAX_IN_FLIGHT))

    @property
    def namespace(self) -> str:
        return f"desktop.{self.user_id}.{self.device_slug}"

    @property
    def state(self) -> str:
        return "connected" if self.send is not None else "disconnected"

    def attach(self, send: Send, close: Closer) -> None:
        self.send, self.close = send, close
        self.disconnected_at = None
        self.connected.set()

    def detach(self, now: float) -> None:
        """The socket is gone: fail what is in flight; keep the session for the grace period."""
        self.send = self.close = None
        self.disconnected_at = now
        self.connected = anyio.Event()
        for pending in list(self.pending.values()):
            pending.settle(error=UpstreamError("the desktop device disconnected during the call"))
        for waiter in list(self.consents.values()):
            waiter.settle(result={"decision": "denied"})

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
            "in_flight": len(self.pending),
        }


class DesktopRegistry:
    """Every desktop session of this process, and a catalog version per (tenant, user).

    Tool limits (`ToolLimits`, from the bridge's settings): `open` and `apply_catalog_update` refuse a
    catalog over either with `FrameError` naming the limit, before changing anything (the bridge
    closes 4002 / 4003).
    """

    def __init__(
        self,
        *,
        grace_period_s: float,
        max_connections_per_user: int = 5,
        clock: Callable[[], float] = time.monotonic,
        events: EventBus | None = None,
    ) -> None:
        self.grace_period_s = grace_period_s
        self.max_connections_per_user = max_connections_per_user
        self.clock = clock
        self.sessions: dict[str, DesktopSession] = {}
        self._versions: dict[tuple[str, str], int] = {}
        self.events = events

    # ---- catalog -----------------------------------------------------------------------------------

    def version(self, tenant_id: str, user_id: str) -> int:
        return self._versions.get((tenant_id, user_id), 0)

    async def changed(self, session: DesktopSession) -> None:
        """The user's desktop catalog moved: a new version, published for list_changed."""
        key = (session.tenant_id, session.user_id)
        self._versions[key] = self._versions.get(key, 0) + 1
        if self.events is not None:
            await self.events.publish(DesktopCatalogChanged(session.tenant_id, session.user_id))

    def sessions_for(self, tenant_id: str, user_id: str) -> list[DesktopSession]:
        return sorted(
            (s for s in self.sessions.values() if s.tenant_id == tenant_id and s.user_id == user_id),
            key=lambda s: s.session_id,
        )

    # ---- lifecycle ---------------------------------------------------------------------------------

    def connected_count(self, tenant_id: str, user_id: str) -> int:
        return sum(
            1
            for s in self.sessions.values()
            if s.tenant_id == tenant_id and s.user_id == user_id and s.send is not None
        )

    def find_device(self, tenant_id: str, user_id: str, device_id: str) -> DesktopSession | None:
        for session in self.sessions.values():
            if (session.tenant_id, session.user_id, session.device_id) == (tenant_id, user_id, device_id):
                return session
        return None

    def _resumable(self, tenant_id: str, user_id: str, init: protocol.SessionInit) -> DesktopSession | None:
        """The session `init.resume_session_id` names, if it is this (tenant, user)'s and device's."""
        old = self.sessions.get(init.resume_session_id) if init.resume_session_id else None
        if old is None or old.tenant_id != tenant_id or old.user_id != user_id:
            return None
        return old if init.device_id is None or old.device_id == init.device_id else None

    def check_tool_limits(
        self, tenant_id: str, user_id: str, count: int, session: DesktopSession | None, limits: ToolLimits
    ) -> None:
        """`FrameError` if `session` (None: a new one) holding `count` tools breaks a limit."""
        if count > limits.per_session:
            raise protocol.FrameError(
                f"{count} tools in one session (limit ws_max_tools_per_session={limits.per_session})"
            )
        others = sum(
            len(s.tools)
            for s in self.sessions.values()
            if s is not session and s.tenant_id == tenant_id and s.user_id == user_id
        )
        if others + count > limits.per_user:
            raise protocol.FrameError(
                f"{others + count} tools across this user's sessions "
                f"(limit ws_max_tools_per_user={limits.per_user})"
            )

    def apply_catalog_update(
        self, session: DesktopSession, update: protocol.CatalogUpdate, limits: ToolLimits
    ) -> None:
        """Removals, then additions; refused whole (`FrameError`, nothing changed) over a limit."""
        tools = dict(session.tools)
        for name in update.removed:
            tools.pop(name, None)
        for tool in update.added:
            tools[tool["name"]] = tool
        self.check_tool_limits(session.tenant_id, session.user_id, len(tools), session, limits)
        session.tools = tools

    def open(
        self, *, user_id: str, tenant_id: str, init: protocol.SessionInit, limits: ToolLimits | None = None
    ) -> tuple[DesktopSession, bool]:
        """A new session, or the resumed one (same tenant, user and device, within the grace period).

        `FrameError` (nothing changed) when the init's tools break one of `limits`.
        """
        old = self._resumable(tenant_id, user_id, init)
        if limits is not None:
            count = len({t["name"] for t in init.capabilities.tools})
            self.check_tool_limits(tenant_id, user_id, count, old, limits)
        if old is not None:
            old.tools = {t["name"]: t for t in init.capabilities.tools}
            old.resources = [r for r in init.capabilities.resources if isinstance(r.get("uri"), str)]
            old.prompts = [p for p in init.capabilities.prompts if isinstance(p.get("name"), str)]
            return old, True
        device_id = init.device_id or uuid.uuid4().hex
        session = DesktopSession(
            session_id=new_session_id(),
            user_id=user_id,
            tenant_id=tenant_id,
            device_id=device_id,
            device_name=init.device_name,
            device_slug=slugify(
                init.device_name, tenant_id=tenant_id, owner_user_id=user_id, server_id=device_id
            ),
            platform=init.platform.model_dump(exclude_none=True),
            client_version=init.client_version,
            audit_detail_level=init.audit_detail_level,
            tools={t["name"]: t for t in init.capabilities.tools},
            resources=[r for r in init.capabilities.resources if isinstance(r.get("uri"), str)],
            prompts=[p for p in init.capabilities.prompts if isinstance(p.get("name"), str)],
        )
        self.sessions[session.session_id] = session
        return session, False

    async def remove(self, session: DesktopSession) -> None:
        if self.sessions.pop(session.session_id, None) is not None:
            session.detach(self.clock())
            await self.changed(session)

    async def expire_once(self) -> list[str]:
        now = self.clock()
        expired = [
            s
            for s in self.sessions.values()
            if s.disconnected_at is not None and now - s.disconnected_at >= self.grace_period_s
        ]
        for session in expired:
            await self.remove(session)
        return [s.session_id for s in expired]

    async def run_expiry(self, interval_s: float = 1.0) -> None:
        """Owned by the app lifespan."""
        while True:
            await anyio.sleep(interval_s)
            await self.expire_once()

    async def close_all(self, code: int, reason: str) -> None:
        for session in list(self.sessions.values()):
            if session.close is not None:
                try:
                    await session.close(code, reason)
                except Exception:
                    logger.debug("close failed", extra={"session_id": session.session_id})

    # ---- calls -------------------------------------------------------------------------------------

    async def invoke(
        self,
        session: DesktopSession,
        method: str,
        params: dict[str, Any],
        *,
        timeout: float,
    ) -> dict[str, Any]:
        """Send a request to the device and wait for its answer, at most `timeout` seconds.

        A disconnected session is waited for (resume) within the same timeout; then the call fails
        `SCAILINK_TOOL_NOT_FOUND` (device offline). At most 32 calls are in flight per session; more
        wait within their timeout.
        """
        invocation_id = uuid.uuid4().hex
        pending = _Pending()
        try:
            with anyio.fail_after(timeout):
                await session.connected.wait()
                async with session.in_flight:
                    send = session.send
                    if send is None:
                        raise UpstreamError("the desktop device disconnected")
                    session.pending[invocation_id] = pending
                    body = {**params, "invocation_id": invocation_id, "timeout_ms": int(timeout * 1000)}
                    await send(protocol.request(invocation_id, method, body))
                    await pending.done.wait()
        except TimeoutError:
            if session.send is None:
                raise ToolNotFound("the desktop device is offline") from None
            raise UpstreamTimeout(f"the desktop device did not answer within {timeout:g} s") from None
        finally:
            if session.pending.pop(invocation_id, None) is not None and not pending.done.is_set():
                session.abandoned.append(invocation_id)
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    def answer(self, session: DesktopSession, message: dict[str, Any]) -> bool:
        """A JSON-RPC response from the device; False if it answers no pending request."""
        pending = session.pending.get(str(message.get("id")))
        if pending is None:
            return str(message.get("id")) in session.abandoned
        if "error" in message:
            err = message["error"] if isinstance(message["error"], dict) else {}
            pending.settle(
                error=UpstreamError(f"desktop tool failed: {str(err.get('message', 'error'))[:200]}")
            )
        elif isinstance(message.get("result"), dict):
            pending.settle(result=message["result"])
        else:
            pending.settle(error=UpstreamError("the desktop device answered with an invalid result"))
        return True

    async def ask_consent(
        self, session: DesktopSession, tool: str, arguments: Any, *, timeout: float
    ) -> bool:
        """`consent_request` to the device; True when approved. Denied, dropped or timed out -> False."""
        if tool in session.approved_for_session:
            return True
        consent_id = uuid.uuid4().hex
        waiter = _Pending()
        session.consents[consent_id] = waiter
        try:
            with anyio.move_on_after(timeout):
                if session.send is None:
                    return False
                await session.send(
                    protocol.notification(
                        protocol.CONSENT_REQUEST,
                        {
                            "consent_id": consent_id,
                            "tool": tool,
                            "arguments": arguments,
                            "expires_ms": int(timeout * 1000),
                        },
                    )
                )
                await waiter.done.wait()
        finally:
            session.consents.pop(consent_id, None)
        answer = waiter.result or {}
        approved = answer.get("decision") == "approved"
        if approved and answer.get("remember") == "session":
            session.approved_for_session.add(tool)
        return approved

    def consent_answered(self, session: DesktopSession, response: protocol.ConsentResponse) -> None:
        waiter = session.consents.get(response.consent_id)
        if waiter is not None:
            waiter.settle(result=response.model_dump())


class DesktopConsentGate:
    """The consent interface for `confirm` remote servers: ask one of the user's connected devices."""

    def __init__(self, registry: DesktopRegistry, timeout_s: float) -> None:
        self.registry = registry
        self.timeout_s = timeout_s

    async def ask(self, principal: Any, public_name: str, arguments: dict[str, Any] | None) -> bool:
        for session in self.registry.sessions_for(principal.tenant_id, principal.user_id):
            if session.send is not None:
                return await self.registry.ask_consent(
                    session, public_name, arguments, timeout=self.timeout_s
                )
        return False


def needs_consent(tool: dict[str, Any]) -> bool:
    meta = tool.get("_meta")
    return isinstance(meta, dict) and meta.get(CONSENT_META_KEY) == "confirm"


def consent_denied() -> ConsentDenied:
    return ConsentDenied("the user denied the invocation, or did not answer in time")
