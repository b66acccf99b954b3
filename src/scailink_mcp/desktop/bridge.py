"""The WebSocket endpoint `/v1/scailink/ws`: handshake, heartbeats, catalog updates, close codes.

Order of checks on a new socket: accept, then the JWT (4001 naming the failed check), then the first
frame within `ws_init_timeout_s` (4002 naming the failing field), then the per-(tenant, user)
connection cap (4009) and the tool limits (4002). A newer connection of the same device of the same
(tenant, user) replaces the older one (4010 on the old socket).
Liveness: no frame for two heartbeat intervals closes with 4008 (uvicorn pings every 20 s).
Token lifetime: an established socket closes with 4001 at the token's `exp` + `jwt_leeway_s`; the
client reconnects with a fresh token and resumes its session.
Hostile frames: a binary frame closes 1003; bad JSON, nesting deeper than `max_json_depth` or an
invalid frame closes 4002 before init and 4003 after, each with one log line and no traceback.

`scailink/catalog_update` limits: each list holds at most `ws_max_tools_per_session` items (checked
by length before any item is validated), the session at most `ws_max_tools_per_session` tools after
the update and the (tenant, user) at most `ws_max_tools_per_user` across its sessions. An update over
a limit is refused whole with 4003 and a reason naming the limit, the session keeping its previous
catalog: a production gateway neither truncates (the device would believe tools are published that
are not) nor ignores silently (a runaway client would never learn). Updates are applied at once, but
the catalog is marked changed at most once per `ws_catalog_change_min_interval_ms` per session (the
rest coalesced into one trailing change), so a flood cannot make the catalogs rebuild repeatedly; the
loop yields after every frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import jwt
from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from scailink_mcp import auth
from scailink_mcp.audit import AuditLog, AuditRecord
from scailink_mcp.auth import Principal, TokenVerifier, bearer_token
from scailink_mcp.config import Settings
from scailink_mcp.desktop import protocol
from scailink_mcp.desktop.connections import DesktopRegistry, DesktopSession, ToolLimits
from scailink_mcp.desktop.protocol import BinaryFrame, Close, FrameError
from scailink_mcp.errors import Forbidden, RateLimited, Unauthorized
from scailink_mcp.ratelimit import RateLimiter

logger = logging.getLogger(__name__)

SERVER_VERSION = "scailink-mcp/0.1.0"


@dataclass
class ChangeThrottle:
    """Marks a session's catalog changed at most once per `interval_s`; later changes wait (coalesced)."""

    interval_s: float
    last: float
    pending: bool = False

    def mark(self, now: float) -> bool:
        """A change happened: True if it is to be published now, else it is pending until `deadline`."""
        if now - self.last >= self.interval_s:
            self.last, self.pending = now, False
            return True
        self.pending = True
        return False

    @property
    def deadline(self) -> float | None:
        return self.last + self.interval_s if self.pending else None

    def due(self, now: float) -> bool:
        """True once when a pending change's time has come."""
        return self.pending and self.mark(now)


class Bridge:
    def __init__(
        self,
        settings: Settings,
        verifier: TokenVerifier,
        registry: DesktopRegistry,
        audit: AuditLog | None = None,
    ) -> None:
        self.audit = audit
        self.settings = settings
        self.verifier = verifier
        self.registry = registry
        self.limits = ToolLimits(settings.ws_max_tools_per_session, settings.ws_max_tools_per_user)
        # Per (tenant, user), not per socket: a device that reconnects does not get a fresh budget.
        self.catalog_updates = RateLimiter(
            per_s=settings.ws_catalog_updates_per_s, burst=settings.ws_catalog_updates_burst
        )

    async def endpoint(self, websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            token = bearer_token(_take_authorization(websocket))
            principal = await self.verifier.verify(token)
            principal.require(auth.VIEW)
            principal.require(auth.INVOKE)
        except (Unauthorized, Forbidden) as exc:
            await _close(websocket, Close.UNAUTHORIZED, exc.message)
            return
        exp = _token_exp(principal, token)
        expires_at = None if exp is None else exp + self.settings.jwt_leeway_s
        try:
            init_id, init = await self._receive_init(websocket)
        except BinaryFrame as exc:
            await _refuse(websocket, Close.UNSUPPORTED_DATA, exc.reason, principal)
            return
        except FrameError as exc:
            await _refuse(websocket, Close.BAD_INIT, exc.reason, principal)
            return
        except WebSocketDisconnect:
            return
        tenant_id, user_id = principal.tenant_id, principal.user_id
        previous = self.registry.find_device(tenant_id, user_id, init.device_id) if init.device_id else None
        replacing = previous is not None and previous.online
        if (
            self.registry.connected_count(tenant_id, user_id) - int(replacing)
            >= self.registry.max_connections_per_user
        ):
            await _close(websocket, Close.TOO_MANY, "too many desktop connections for this user")
            return
        if previous is not None and not init.resume_session_id:
            init = init.model_copy(update={"resume_session_id": previous.session_id})
        try:
            session, resumed = self.registry.open(
                user_id=user_id, tenant_id=tenant_id, init=init, limits=self.limits
            )
        except FrameError as exc:
            await _refuse(websocket, Close.BAD_INIT, exc.reason, principal)
            return
        if previous is not None and previous.close is not None:
            await previous.close(Close.REPLACED, "replaced by a newer connection of the same device")
        # asyncio's lock makes its waiter queue on first contention, anyio's at once (~0.7 KiB of
        # every idle session); ScaiLink runs on asyncio (uvicorn).
        lock = asyncio.Lock()

        async def send(text: str) -> None:
            async with lock:
                await websocket.send_text(text)

        async def close(code: int, reason: str) -> None:
            await _close(websocket, code, reason)

        session.attach(send, close)
        await self.registry.changed(session)
        await send(protocol.result(init_id, self._ack(session, init, resumed)))
        self._audit(session, "desktop_session_start")
        logger.info(
            "desktop session started",
            extra={"session_id": session.session_id, "user_id": session.user_id, "resumed": resumed},
        )
        # This frame lives as long as the socket: the parsed init (a model of the device's whole
        # catalog, which the session holds in its own form) and the token are not kept with it.
        del init, token, previous
        try:
            await self._serve(websocket, session, expires_at)
        finally:
            if session.send is send:  # not already replaced by a newer socket
                await self.registry.detached(session)
                self._audit(session, "desktop_session_end")
            logger.info("desktop session disconnected", extra={"session_id": session.session_id})

    def _audit(self, session: DesktopSession, event: str) -> None:
        if self.audit is not None:
            self.audit.record(
                AuditRecord(
                    tenant_id=session.tenant_id,
                    user_id=session.user_id,
                    event=event,
                    outcome="ok",
                    target=f"{session.device_name} ({session.session_id})",
                    detail_level=session.audit_detail_level,
                )
            )

    async def _receive_init(self, websocket: WebSocket) -> tuple[Any, protocol.SessionInit]:
        text: str | None = None
        with anyio.move_on_after(self.settings.ws_init_timeout_s):
            text = await _receive_text(websocket)
        if text is None:
            raise FrameError(f"no scailink/session_init within {self.settings.ws_init_timeout_s:g} s")
        message = protocol.parse_frame(text, self.settings.max_json_depth)
        return message.get("id"), protocol.parse_init(message)

    def _ack(self, session: DesktopSession, init: protocol.SessionInit, resumed: bool) -> dict[str, Any]:
        return {
            "session_id": session.session_id,
            "resumed": resumed,
            "heartbeat_interval_ms": self.settings.ws_heartbeat_interval_ms,
            "grace_period_ms": self.settings.ws_grace_period_ms,
            "accepted": {
                "tools": len(init.capabilities.tools),
                "resources": len(init.capabilities.resources),
                "prompts": len(init.capabilities.prompts),
                "resource_templates": len(init.capabilities.resource_templates),
            },
            "rejected": [],
            "server_version": SERVER_VERSION,
            "namespace": session.namespace,
        }

    async def _serve(self, websocket: WebSocket, session: DesktopSession, expires_at: float | None) -> None:
        """Frames until the socket ends; wakes for liveness (4008), token expiry (`expires_at`, epoch
        seconds: 4001) and a pending coalesced catalog change, whichever comes first."""
        clock = time.monotonic
        silence = 2 * self.settings.ws_heartbeat_interval_ms / 1000
        expiry = None if expires_at is None else clock() + (expires_at - time.time())
        last_frame = clock()
        throttle = ChangeThrottle(self.settings.ws_catalog_change_min_interval_ms / 1000, last=last_frame)
        try:
            while True:
                now = clock()
                if expiry is not None and now >= expiry:
                    await _refuse(websocket, Close.UNAUTHORIZED, "token expired", session)
                    return
                if throttle.due(now):
                    await self.registry.changed(session)
                wake = min(t for t in (last_frame + silence, expiry, throttle.deadline) if t is not None)
                text: str | None = None
                with anyio.move_on_after(max(0.0, wake - now)):
                    try:
                        text = await _receive_text(websocket)
                    except (WebSocketDisconnect, RuntimeError):  # peer gone, or closed by us
                        return
                    except BinaryFrame as exc:
                        await _refuse(websocket, Close.UNSUPPORTED_DATA, exc.reason, session)
                        return
                if text is None:
                    if clock() >= last_frame + silence:
                        await _close(websocket, Close.LIVENESS, "no frame within two heartbeat intervals")
                        return
                    continue
                last_frame = clock()
                if protocol.CATALOG_UPDATE in text and not self._catalog_update_allowed(session):
                    reason = (
                        f"catalog_update rate exceeded ({self.settings.ws_catalog_updates_per_s:g} per s)"
                    )
                    await _refuse(websocket, Close.PROTOCOL, reason, session)
                    return
                try:
                    message = protocol.parse_frame(text, self.settings.max_json_depth)
                    done = await self._handle(session, message, throttle)
                except FrameError as exc:
                    await _refuse(websocket, Close.PROTOCOL, exc.reason, session)
                    return
                if done:
                    await _close(websocket, Close.NORMAL, "session terminated by the client")
                    await self.registry.remove(session)
                    return
                await anyio.lowlevel.checkpoint()  # a flood of frames never starves the loop
        finally:
            if throttle.pending:
                await self.registry.changed(session)

    def _catalog_update_allowed(self, session: DesktopSession) -> bool:
        """Checked on the raw text, before parsing: a flood costs a substring search per frame."""
        try:
            self.catalog_updates.check(f"{session.tenant_id}/{session.user_id}")
        except RateLimited:
            return False
        return True

    async def _handle(
        self, session: DesktopSession, message: dict[str, Any], throttle: ChangeThrottle
    ) -> bool:
        method = message.get("method")
        if method is None:
            if "id" in message and ("result" in message or "error" in message):
                if not self.registry.answer(session, message):
                    raise FrameError("response to no pending request")
                return False
            raise FrameError("frame is neither a request, a notification nor a response")
        if "id" in message:
            raise FrameError(f"unknown request method {str(method)[:60]!r}")
        params = message.get("params") or {}
        if method == protocol.HEARTBEAT:
            return False
        if method == protocol.TERMINATE:
            return True
        try:
            if method == protocol.CATALOG_UPDATE:
                update = protocol.CatalogUpdate.model_validate(
                    params, context={protocol.MAX_ITEMS: self.limits.per_session}
                )
                self.registry.apply_catalog_update(session, update, self.limits)
                if throttle.mark(time.monotonic()):
                    await self.registry.changed(session)
            elif method == protocol.CONSENT_RESPONSE:
                self.registry.consent_answered(session, protocol.ConsentResponse.model_validate(params))
            elif method == protocol.PROGRESS:
                await session.relay_progress(protocol.Progress.model_validate(params))
            else:
                raise FrameError(f"unknown notification {str(method)[:60]!r}")
        except ValidationError as exc:
            raise FrameError(protocol.first_error_field(exc)) from None
        return False


def _take_authorization(websocket: WebSocket) -> str | None:
    """The upgrade request's `Authorization`, the one header read after the handshake; the header
    list then leaves the connection's scope, which lives as long as the socket (~1.5 KiB of each idle
    session, and the bearer token with it)."""
    value = Headers(scope=websocket.scope).get("authorization")
    websocket.scope["headers"] = []
    return value


async def _receive_text(websocket: WebSocket) -> str:
    """The next text frame; `BinaryFrame` for a binary one, `WebSocketDisconnect` when the peer left."""
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
    text = message.get("text")
    if text is None:
        raise BinaryFrame()
    return str(text)


def _token_exp(principal: Principal, token: str) -> float | None:
    """The verified token's `exp` (epoch seconds): `Principal.expires_at` when the verifier provides
    it, else the claim read from the token, whose signature and claims were just checked."""
    exp = getattr(principal, "expires_at", None)
    if exp is None:
        with contextlib.suppress(jwt.PyJWTError):
            exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


async def _refuse(websocket: WebSocket, code: int, reason: str, who: Principal | DesktopSession) -> None:
    """Close for a client's fault, with one log line (no traceback, never the frame's content)."""
    logger.info(
        "desktop socket refused",
        extra={"close_code": code, "reason": reason, "tenant_id": who.tenant_id, "user_id": who.user_id},
    )
    await _close(websocket, code, reason)


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    if websocket.application_state != WebSocketState.DISCONNECTED:
        with contextlib.suppress(RuntimeError):  # already closed by the peer
            await websocket.close(code=code, reason=reason[:120])
