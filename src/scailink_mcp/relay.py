"""Server-to-client traffic from an upstream, relayed to the downstream session that made the call.

An upstream may ask its client for `sampling/createMessage`, `elicitation/create` or `roots/list`, and
send log messages, while it serves a call. ScaiLink is that client: it forwards each to the downstream
MCP session whose call is in flight on that pooled upstream session, and sends the answer back.

The SDK does not tell a client which of its requests a server-initiated request relates to, so when
several downstream calls share one pooled session (same user, same server) the most recent in-flight
call receives it. Pooled sessions are per user, so this never crosses users. A 2026-07-28 caller has
no back-channel: its call's `PendingCall` parks the request for the caller's next round instead
(era_bridge.py).

Having these callbacks is also what makes an SDK client declare `sampling`, `elicitation` and `roots`,
and servers may offer some tools only to clients that declare them. So discovery's session declares
exactly the same (`unrelayed_options`, whose callbacks answer that nobody is there to ask): what
discovery lists is what a pooled session may call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import mcp_types as types
from mcp.client.session import ClientRequestContext
from mcp.server.session import ServerSession
from mcp.shared.exceptions import MCPError
from mcp.shared.message import ServerMessageMetadata

from scailink_mcp.era_pending import PendingCall
from scailink_mcp.remote.pool import PoolKey, UpstreamPool

logger = logging.getLogger(__name__)

METHOD_NOT_FOUND = -32601
# The client capabilities whose server-to-client requests travel over a downstream back-channel.
BACK_CHANNEL = ("sampling", "elicitation", "roots")
INTERNAL_ERROR = -32603


@runtime_checkable
class Downstream(Protocol):
    """Where relayed traffic of one downstream call goes: the SDK's session of the call
    (`DownstreamCall`) or the `/mcp` front's answer stream (`mcp_front.py`)."""

    def supports(self, capability: str) -> bool: ...
    async def ask(self, request: Any, result_type: Any) -> Any: ...
    async def log(self, params: types.LoggingMessageNotificationParams) -> None: ...


@dataclass(frozen=True)
class DownstreamCall:
    """The downstream request an upstream call serves, in the SDK's server: where relayed traffic goes."""

    session: ServerSession
    request_id: types.RequestId | None

    def metadata(self) -> ServerMessageMetadata | None:
        return (
            ServerMessageMetadata(related_request_id=self.request_id) if self.request_id is not None else None
        )

    def supports(self, capability: str) -> bool:
        caps = self.session.client_capabilities
        return caps is not None and getattr(caps, capability, None) is not None

    async def ask(self, request: Any, result_type: Any) -> Any:
        return await self.session.send_request(request, result_type, metadata=self.metadata())

    async def log(self, params: types.LoggingMessageNotificationParams) -> None:
        await self.session.send_notification(
            types.LoggingMessageNotification(params=params), related_request_id=self.request_id
        )


class Relay:
    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool

    def _call(self, key: PoolKey) -> Downstream | None:
        current = self.pool.current_relay(key)
        if isinstance(current, PendingCall):  # a 2026-07-28 caller's round (era_bridge.py)
            current = current.downstream
        return current if isinstance(current, Downstream) else None

    async def _forward(self, key: PoolKey, request: Any, result_type: Any, capability: str) -> Any:
        current = self.pool.current_relay(key)
        if isinstance(current, PendingCall):  # no back-channel: parked for the caller's next round
            return await current.ask(request, result_type, capability)
        call = self._call(key)
        if call is None:
            return types.ErrorData(
                code=METHOD_NOT_FOUND, message=f"no downstream call to relay {capability} to"
            )
        if not call.supports(capability):
            return types.ErrorData(
                code=METHOD_NOT_FOUND, message=f"the calling client does not support {capability}"
            )
        try:
            return await call.ask(request, result_type)
        except MCPError as exc:
            return exc.error
        except Exception as exc:
            logger.info("relay failed", extra={"capability": capability, "error": type(exc).__name__})
            return types.ErrorData(code=INTERNAL_ERROR, message=f"relay of {capability} failed")

    def session_options(self, key: PoolKey) -> dict[str, Any]:
        """Callbacks for the pooled `ClientSession` of `key` (which also declares these capabilities)."""

        async def sampling(context: ClientRequestContext, params: types.CreateMessageRequestParams) -> Any:
            return await self._forward(
                key, types.CreateMessageRequest(params=params), types.CreateMessageResult, "sampling"
            )

        async def elicitation(context: ClientRequestContext, params: types.ElicitRequestParams) -> Any:
            return await self._forward(
                key, types.ElicitRequest(params=params), types.ElicitResult, "elicitation"
            )

        async def roots(context: ClientRequestContext) -> Any:
            return await self._forward(key, types.ListRootsRequest(), types.ListRootsResult, "roots")

        async def log(params: types.LoggingMessageNotificationParams) -> None:
            call = self._call(key)
            if call is None:
                return
            try:
                await call.log(params)
            except Exception as exc:
                logger.debug("log relay failed", extra={"error": type(exc).__name__})

        return {
            "sampling_callback": sampling,
            "elicitation_callback": elicitation,
            "list_roots_callback": roots,
            "logging_callback": log,
        }


def unrelayed_options() -> dict[str, Any]:
    """The callbacks of a session with no downstream caller (discovery): the same capabilities are
    declared as on a pooled session, and a server-to-client request is answered -32601."""

    def refuse(capability: str) -> types.ErrorData:
        return types.ErrorData(code=METHOD_NOT_FOUND, message=f"no downstream call to relay {capability} to")

    async def sampling(context: ClientRequestContext, params: types.CreateMessageRequestParams) -> Any:
        return refuse("sampling")

    async def elicitation(context: ClientRequestContext, params: types.ElicitRequestParams) -> Any:
        return refuse("elicitation")

    async def roots(context: ClientRequestContext) -> Any:
        return refuse("roots")

    return {"sampling_callback": sampling, "elicitation_callback": elicitation, "list_roots_callback": roots}
