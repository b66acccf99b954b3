"""Live desktop sessions by (tenant, user, device); invocation with timeout; the grace period.

Identity is always (tenant, user): a user id is unique only inside its tenant, so the device lookup,
the per-user connection cap, resume and the tool limits all compare both.

A session (`sessions.py`) outlives its WebSocket for the grace period and can be resumed; after it,
the session expires and its tools leave the catalog. Every pending invocation is a future owned by
its session and removed in a `finally`, so nothing is left behind when a device drops mid-call.
Consent on the device is `consent.py`'s; the registry's `ask_consent` forwards to it.

Must not: validate frames (`protocol.py` and the bridge do), or decide permissions and consent tiers.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
from mcp.shared.dispatcher import ProgressFnT

from scailink_mcp.desktop import consent, protocol
from scailink_mcp.desktop.consent import CONSENT_META_KEY, DesktopConsentGate, consent_denied, needs_consent
from scailink_mcp.desktop.limits import ToolLimits
from scailink_mcp.desktop.sessions import (
    MAX_IN_FLIGHT,
    Closer,
    DesktopSession,
    Pending,
    Send,
    new_session_id,
    offers,
)
from scailink_mcp.errors import DeviceOffline, ToolNotFound, UpstreamError, UpstreamTimeout
from scailink_mcp.events import DesktopCatalogChanged, EventBus
from scailink_mcp.naming import device_slug

if TYPE_CHECKING:
    from scailink_mcp.desktop.cluster import DesktopCluster

# Importers reach these through this module; they live in `sessions.py` and `consent.py`.
__all__ = [
    "CONSENT_META_KEY",
    "MAX_IN_FLIGHT",
    "Closer",
    "DesktopConsentGate",
    "DesktopRegistry",
    "DesktopSession",
    "Send",
    "ToolLimits",
    "consent_denied",
    "needs_consent",
    "new_session_id",
]

logger = logging.getLogger(__name__)


class DesktopRegistry:
    """Every desktop session of this process (`sessions`) and, with several replicas, the peers'
    (`peers`, a mirror kept by `cluster`); a catalog version per (tenant, user).

    Lookups (`all`, `get`, `sessions_for`, `find_device`, the per-user cap and tool limits) see both;
    a call for a peer's session is forwarded to the worker holding its socket (`cluster.forward`).

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
        cluster: DesktopCluster | None = None,
    ) -> None:
        self.grace_period_s = grace_period_s
        self.max_connections_per_user = max_connections_per_user
        self.clock = clock
        self.sessions: dict[str, DesktopSession] = {}
        self.peers: dict[str, DesktopSession] = {}
        self.versions: dict[tuple[str, str], int] = {}  # (tenant, user): desktop catalog version
        self.events = events
        self.cluster = cluster
        if cluster is not None:
            cluster.registry = self

    # ---- catalog -----------------------------------------------------------------------------------

    def version(self, tenant_id: str, user_id: str) -> int:
        return self.versions.get((tenant_id, user_id), 0)

    async def changed(self, session: DesktopSession) -> None:
        """The user's desktop catalog moved: a new version, published for list_changed (and, for
        this worker's own session, announced to the other replicas)."""
        key = (session.tenant_id, session.user_id)
        self.versions[key] = self.versions.get(key, 0) + 1
        if self.cluster is not None and self.sessions.get(session.session_id) is session:
            self.cluster.announce(session)
        if self.events is not None:
            await self.events.publish(DesktopCatalogChanged(session.tenant_id, session.user_id))

    def all(self) -> list[DesktopSession]:
        """This worker's sessions and the peers' (a session id is in one of the two)."""
        return [*self.sessions.values(), *(s for i, s in self.peers.items() if i not in self.sessions)]

    def get(self, session_id: str) -> DesktopSession | None:
        return self.sessions.get(session_id) or self.peers.get(session_id)

    def sessions_for(self, tenant_id: str, user_id: str) -> list[DesktopSession]:
        return sorted(
            (s for s in self.all() if s.tenant_id == tenant_id and s.user_id == user_id),
            key=lambda s: s.session_id,
        )

    # ---- lifecycle ---------------------------------------------------------------------------------

    def connected_count(self, tenant_id: str, user_id: str) -> int:
        return sum(1 for s in self.sessions_for(tenant_id, user_id) if s.online)

    def find_device(self, tenant_id: str, user_id: str, device_id: str) -> DesktopSession | None:
        for session in self.all():
            if (session.tenant_id, session.user_id, session.device_id) == (tenant_id, user_id, device_id):
                return session
        return None

    def _resumable(self, tenant_id: str, user_id: str, init: protocol.SessionInit) -> DesktopSession | None:
        """The session `init.resume_session_id` names, if it is this (tenant, user)'s and device's."""
        old = self.get(init.resume_session_id) if init.resume_session_id else None
        if old is None or old.tenant_id != tenant_id or old.user_id != user_id:
            return None
        return old if init.device_id is None or old.device_id == init.device_id else None

    def check_tool_limits(
        self, tenant_id: str, user_id: str, count: int, session: DesktopSession | None, limits: ToolLimits
    ) -> None:
        """`FrameError` if `session` (None: a new one) holding `count` tools breaks a limit."""
        limits.check(
            count, sum(len(s.tools) for s in self.sessions_for(tenant_id, user_id) if s is not session)
        )

    def apply_catalog_update(
        self, session: DesktopSession, update: protocol.CatalogUpdate, limits: ToolLimits
    ) -> None:
        """Removals, then additions; refused whole (`FrameError`, nothing changed) over a limit."""
        tools = limits.updated(session.tools, update)
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
        if old is not None and old.owner:  # resumed here after a socket on another replica
            old = self._take_over(old)
        if old is not None:
            for name, items in offers(init.capabilities).items():
                setattr(old, name, items)
            return old, True
        device_id = init.device_id or uuid.uuid4().hex
        session = DesktopSession(
            session_id=new_session_id(),
            user_id=user_id,
            tenant_id=tenant_id,
            device_id=device_id,
            device_name=init.device_name,
            device_slug=device_slug(
                init.device_name, tenant_id=tenant_id, user_id=user_id, device_id=device_id
            ),
            platform=init.platform.model_dump(exclude_none=True),
            client_version=init.client_version,
            audit_detail_level=init.audit_detail_level,
            **offers(init.capabilities),
        )
        self.sessions[session.session_id] = session
        return session, False

    def _take_over(self, peer: DesktopSession) -> DesktopSession:
        """A peer's session becomes this worker's (its newer announcement fences the old owner out)."""
        self.peers.pop(peer.session_id, None)
        session = dataclasses.replace(peer, owner="", peer_state="connected", peer_in_flight=0)
        session.connected, session.pending, session.consents = anyio.Event(), {}, {}
        self.sessions[session.session_id] = session
        return session

    async def detached(self, session: DesktopSession) -> None:
        """The socket is gone; the session stays for the grace period (peers see it disconnected)."""
        session.detach(self.clock())
        if self.cluster is not None and self.sessions.get(session.session_id) is session:
            self.cluster.announce(session)

    async def remove(self, session: DesktopSession) -> None:
        if self.sessions.pop(session.session_id, None) is not None:
            session.detach(self.clock())
            if self.cluster is not None:
                self.cluster.withdraw(session)
            await self.changed(session)

    async def terminate(self, session: DesktopSession, code: int, reason: str) -> None:
        """Close the socket wherever it is and end the session (`DELETE /sessions/{id}`)."""
        if session.owner and self.cluster is not None:
            await self.cluster.forward(session, "terminate", {"code": code, "reason": reason}, 10.0)
            return
        if session.close is not None:
            await session.close(code, reason)
        await self.remove(session)

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
        progress: ProgressFnT | None = None,
    ) -> dict[str, Any]:
        """Send a request to the device and wait for its answer, at most `timeout` seconds.

        A disconnected session is waited for (resume) within the same timeout; then the call fails
        `SCAILINK_TOOL_NOT_FOUND` (device offline). At most 32 calls are in flight per session; more
        wait within their timeout. With `progress` the frame says `progress: true` and the device's
        `scailink/progress` frames reach it (not for a device on another replica: dropped there).
        """
        if session.owner:
            answer: dict[str, Any] = await self._forward(
                session, "invoke", {"method": method, "params": params}, timeout
            )
            return answer
        invocation_id = uuid.uuid4().hex
        pending = Pending(progress=progress)
        try:
            with anyio.fail_after(timeout):
                await session.until_connected()
                async with session.in_flight:
                    send = session.send
                    if send is None:
                        raise UpstreamError("the desktop device disconnected")
                    session.pending[invocation_id] = pending
                    body = {**params, "invocation_id": invocation_id, "timeout_ms": int(timeout * 1000)}
                    if progress is not None:
                        body["progress"] = True
                    await send(protocol.request(invocation_id, method, body))
                    await pending.done.wait()
        except TimeoutError:
            if session.send is None:
                raise ToolNotFound("the desktop device is offline") from None
            raise UpstreamTimeout(f"the desktop device did not answer within {timeout:g} s") from None
        finally:
            if session.pending.pop(invocation_id, None) is not None and not pending.done.is_set():
                session.abandon(invocation_id)
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    def answer(self, session: DesktopSession, message: dict[str, Any]) -> bool:
        """A JSON-RPC response from the device; False if it answers no pending request."""
        pending = session.pending.get(str(message.get("id")))
        if pending is None:
            return session.was_abandoned(str(message.get("id")))
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
        """`consent.ask_consent`: True when the device's user approved within `timeout`."""
        if session.owner:
            body = {"tool": tool, "arguments": arguments}
            return bool(await self._forward(session, "consent", body, timeout))
        return await consent.ask_consent(session, tool, arguments, timeout=timeout)

    def consent_answered(self, session: DesktopSession, response: protocol.ConsentResponse) -> None:
        consent.consent_answered(session, response)

    # ---- several replicas (cluster.py calls these) -------------------------------------------------

    async def _forward(self, session: DesktopSession, op: str, body: dict[str, Any], timeout: float) -> Any:
        if self.cluster is None:
            raise DeviceOffline("the desktop device is on another replica")
        return await self.cluster.forward(session, op, body, timeout)

    async def serve_peer(self, session: DesktopSession, message: dict[str, Any]) -> Any:
        """A request forwarded by a peer for one of this worker's sessions."""
        op, timeout = message["op"], float(message["timeout"])
        if op == "invoke":
            return await self.invoke(
                session, str(message["method"]), dict(message["params"]), timeout=timeout
            )
        if op == "consent":
            return await self.ask_consent(
                session, str(message["tool"]), message.get("arguments"), timeout=timeout
            )
        await self.terminate(session, int(message["code"]), str(message["reason"]))
        return None

    async def _peers_changed(self, *sessions: DesktopSession) -> None:
        for key in {(s.tenant_id, s.user_id) for s in sessions}:
            self.versions[key] = self.versions.get(key, 0) + 1
            if self.events is not None:
                await self.events.publish(DesktopCatalogChanged(*key))

    async def apply_peer(self, record: dict[str, Any], owner: str, epoch: int) -> None:
        """A peer announced one of its sessions; the newest announcement of a session or device wins."""
        peer = DesktopSession.from_record(record, owner, epoch)
        known = self.get(peer.session_id)
        if known is not None and known.epoch > epoch:
            return  # an older announcement, overtaken
        self.peers[peer.session_id] = peer
        same = (peer.tenant_id, peer.user_id, peer.device_id)
        for mine in list(self.sessions.values()):
            moved = mine.session_id == peer.session_id
            if (moved or (mine.tenant_id, mine.user_id, mine.device_id) == same) and mine.epoch < epoch:
                await self._fenced_out(mine, moved)
        await self._peers_changed(peer)

    async def _fenced_out(self, mine: DesktopSession, moved: bool) -> None:
        """A newer connection of this device is on another replica: close ours with 4010."""
        close = mine.close
        self.sessions.pop(mine.session_id, None)
        mine.detach(self.clock())
        if self.cluster is not None:
            self.cluster.forget(mine) if moved else self.cluster.withdraw(mine)
        if close is not None:
            try:
                await close(protocol.Close.REPLACED, "replaced by a newer connection of the same device")
            except Exception:
                logger.debug("close failed", extra={"session_id": mine.session_id})

    async def drop_peer(self, session_id: str, epoch: int) -> None:
        peer = self.peers.get(session_id)
        if peer is not None and peer.epoch <= epoch:
            del self.peers[session_id]
            await self._peers_changed(peer)

    async def drop_owner(self, owner: str) -> None:
        """A peer worker is gone: its sessions leave the mirror."""
        gone = [s for s in self.peers.values() if s.owner == owner]
        for session in gone:
            del self.peers[session.session_id]
        await self._peers_changed(*gone)

    async def load_peers(self, found: list[tuple[dict[str, Any], str, int]]) -> None:
        """The directory as read from Redis (start-up, reconnect) replaces the mirror."""
        before = list(self.peers.values())
        self.peers = {}
        for record, owner, epoch in found:
            peer = DesktopSession.from_record(record, owner, epoch)
            if peer.session_id not in self.sessions:
                self.peers[peer.session_id] = peer
        await self._peers_changed(*before, *self.peers.values())
