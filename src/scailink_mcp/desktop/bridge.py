"""The WebSocket endpoint `/v1/scailink/ws`: handshake, heartbeats, catalog updates, close codes.

Order of checks on a new socket: accept, then the JWT (4001 naming the failed check), then the first
frame within `ws_init_timeout_s` (4002 naming the failing field), then the per-user connection cap
(4009). A newer connection of the same device replaces the older one (4010 on the old socket).
Liveness: no frame for two heartbeat intervals closes with 4008 (uvicorn pings every 20 s).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import anyio
from pydantic import ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from scailink_mcp import auth
from scailink_mcp.audit import AuditLog, AuditRecord
from scailink_mcp.auth import TokenVerifier, bearer_token
from scailink_mcp.config import Settings
from scailink_mcp.desktop import protocol
from scailink_mcp.desktop.connections import DesktopRegistry, DesktopSession
from scailink_mcp.desktop.protocol import Close, FrameError
from scailink_mcp.errors import Forbidden, Unauthorized

logger = logging.getLogger(__name__)

SERVER_VERSION = "scailink-mcp/0.1.0"


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

    async def endpoint(self, websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            principal = await self.verifier.verify(bearer_token(websocket.headers.get("authorization")))
            principal.require(auth.VIEW)
            principal.require(auth.INVOKE)
        except (Unauthorized, Forbidden) as exc:
            await _close(websocket, Close.UNAUTHORIZED, exc.message)
            return
        try:
            init_id, init = await self._receive_init(websocket)
        except FrameError as exc:
            await _close(websocket, Close.BAD_INIT, exc.reason)
            return
        except WebSocketDisconnect:
            return
        previous = self.registry.find_device(principal.user_id, init.device_id) if init.device_id else None
        replacing = previous is not None and previous.send is not None
        if (
            self.registry.connected_count(principal.user_id) - int(replacing)
            >= self.registry.max_connections_per_user
        ):
            await _close(websocket, Close.TOO_MANY, "too many desktop connections for this user")
            return
        if previous is not None:
            if previous.close is not None:
                await previous.close(Close.REPLACED, "replaced by a newer connection of the same device")
            if not init.resume_session_id:
                init = init.model_copy(update={"resume_session_id": previous.session_id})
        session, resumed = self.registry.open(
            user_id=principal.user_id, tenant_id=principal.tenant_id, init=init
        )
        lock = anyio.Lock()

        async def send(text: str) -> None:
            async with lock:
                await websocket.send_text(text)

        async def close(code: int, reason: str) -> None:
            await _close(websocket, code, reason)

        session.attach(send, close)
        self.registry.changed(session)
        await send(protocol.result(init_id, self._ack(session, init, resumed)))
        self._audit(session, "desktop_session_start")
        logger.info(
            "desktop session started",
            extra={"session_id": session.session_id, "user_id": session.user_id, "resumed": resumed},
        )
        try:
            await self._serve(websocket, session)
        finally:
            if session.send is send:  # not already replaced by a newer socket
                session.detach(self.registry.clock())
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
            text = await websocket.receive_text()
        if text is None:
            raise FrameError(f"no scailink/session_init within {self.settings.ws_init_timeout_s:g} s")
        message = protocol.parse_frame(text)
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
            },
            "rejected": [],
            "server_version": SERVER_VERSION,
            "namespace": session.namespace,
        }

    async def _serve(self, websocket: WebSocket, session: DesktopSession) -> None:
        silence = 2 * self.settings.ws_heartbeat_interval_ms / 1000
        while True:
            text: str | None = None
            with anyio.move_on_after(silence):
                try:
                    text = await websocket.receive_text()
                except WebSocketDisconnect:
                    return
                except RuntimeError:  # the socket was closed by us (replaced, terminated)
                    return
            if text is None:
                await _close(websocket, Close.LIVENESS, "no frame within two heartbeat intervals")
                return
            try:
                done = await self._handle(session, protocol.parse_frame(text))
            except FrameError as exc:
                await _close(websocket, Close.PROTOCOL, exc.reason)
                return
            if done:
                await _close(websocket, Close.NORMAL, "session terminated by the client")
                self.registry.remove(session)
                return

    async def _handle(self, session: DesktopSession, message: dict[str, Any]) -> bool:
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
                update = protocol.CatalogUpdate.model_validate(params)
                for name in update.removed:
                    session.tools.pop(name, None)
                for tool in update.added:
                    session.tools[tool["name"]] = tool
                self.registry.changed(session)
            elif method == protocol.CONSENT_RESPONSE:
                self.registry.consent_answered(session, protocol.ConsentResponse.model_validate(params))
            else:
                raise FrameError(f"unknown notification {str(method)[:60]!r}")
        except ValidationError as exc:
            raise FrameError(protocol.first_error_field(exc)) from None
        return False


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    if websocket.application_state != WebSocketState.DISCONNECTED:
        with contextlib.suppress(RuntimeError):  # already closed by the peer
            await websocket.close(code=code, reason=reason[:120])
