"""One warm upstream session as the pool holds it, and how a `tools/call` is sent on it.

`PooledSession` is typed: the SDK `ClientSession`, the lean `tools/call` path ScaiLink added to it
over Streamable HTTP (`wire.py`; None over legacy SSE) and the bound on its answers (`AnswerLimit`).
The pool reads those fields here instead of looking attributes up on the SDK object by name.

Must not: open or close anything (the pool's owner task holds the session's context), nor validate
an upstream's `tools/call` result (a proxy passes it through unchanged).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import mcp_types as types
from mcp.client.session import ClientSession
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError
from mcp_types import (
    CLIENT_CAPABILITIES_META_KEY,
    CLIENT_INFO_META_KEY,
    INVALID_REQUEST,
    PROTOCOL_VERSION_META_KEY,
)
from mcp_types.version import LATEST_MODERN_VERSION, MODERN_PROTOCOL_VERSIONS

from scailink_mcp.errors import ProtocolError
from scailink_mcp.remote.answers import AnswerLimit
from scailink_mcp.remote.upstream import CLIENT_INFO, UpstreamSession
from scailink_mcp.remote.wire import MessageSink, UpstreamHTTPError, Wire

PROGRESS_TOKEN = "scailink-progress"
# Where an upstream's `notifications/message` params go during a 2026-07-28 call.
LogSink = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class PooledSession:
    client: ClientSession
    wire: Wire | None = None
    answer_limit: AnswerLimit | None = None

    @classmethod
    def of(cls, session: ClientSession) -> PooledSession:
        """What `open_session` yielded; any other `ClientSession` goes through the SDK only."""
        if isinstance(session, UpstreamSession):
            return cls(session, session.wire, session.answer_limit)
        return cls(session)

    @property
    def modern_only(self) -> bool:
        """The upstream refused `initialize` and the session adopted its `server/discover`."""
        return self.wire is not None and self.wire.protocol_version in MODERN_PROTOCOL_VERSIONS

    def trips(self) -> int:
        """How many reads the answer bound has stopped so far."""
        return self.answer_limit.tripped if self.answer_limit is not None else 0

    def tripped_since(self, before: int) -> AnswerLimit | None:
        """The `AnswerLimit` if it stopped a read since `trips()` was `before`, else None."""
        limit = self.answer_limit
        return limit if limit is not None and limit.tripped > before else None

    async def call_tool(
        self,
        params: dict[str, Any],
        meta: dict[str, Any] | None,
        progress: ProgressFnT | None,
        *,
        lean: bool,
        capabilities: Callable[[], dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """The upstream's `tools/call` result dict, never re-validated.

        Over Streamable HTTP (and `lean`) it is one POST on the wire. Otherwise it is the SDK's
        `send_request` (never `ClientSession.call_tool`: a proxy must not validate the upstream's
        output against its schema, nor pay the `tools/list` the SDK issues to learn it).
        An upstream that speaks only 2026-07-28 is called in that era, declaring `capabilities` (the
        caller's: the upstream asks only for what the caller can answer, era_reverse.py).
        """
        if self.modern_only:
            envelope = {**(meta or {}), **modern_envelope(capabilities() if capabilities else {})}
            return await self.modern("tools/call", {**params, "_meta": envelope}, progress)
        if lean and self.wire is not None:
            return await self.wire.call_tool(
                _with_progress(params, meta, progress), _sink(self.wire, progress)
            )
        request = types.CallToolRequest(
            params=types.CallToolRequestParams.model_validate({**params, "_meta": meta} if meta else params)
        )
        result = await self.client.send_request(request, types.CallToolResult, progress_callback=progress)
        return result.model_dump(by_alias=True, mode="json", exclude_none=True)

    async def modern(
        self, method: str, params: dict[str, Any], progress: ProgressFnT | None, log: LogSink | None = None
    ) -> dict[str, Any]:
        """`method` sent in the 2026-07-28 era over this session's HTTP client (its credentials, its
        answer bound), the result dict unchanged. The upstream's JSON-RPC error, or a 4xx (a server
        that does not speak the era), is a `ProtocolError` the caller may pass on as it came."""
        if self.wire is None:
            raise ProtocolError("the upstream is reached over legacy SSE", rpc_code=INVALID_REQUEST)
        try:
            envelope = params.get("_meta")
            params = _with_progress(params, envelope if isinstance(envelope, dict) else None, progress)
            return await self.wire.request(method, params, _sink(self.wire, progress, log), modern=True)
        except MCPError as exc:
            raise ProtocolError(exc.error.message, rpc_code=exc.error.code, data=exc.error.data) from None
        except UpstreamHTTPError as exc:
            if 400 <= exc.status < 500:
                raise ProtocolError(str(exc), rpc_code=INVALID_REQUEST) from None
            raise


def modern_envelope(capabilities: dict[str, Any]) -> dict[str, Any]:
    """The 2026-07-28 `_meta` envelope of a request ScaiLink sends as the client."""
    return {
        PROTOCOL_VERSION_META_KEY: LATEST_MODERN_VERSION,
        CLIENT_INFO_META_KEY: CLIENT_INFO.model_dump(mode="json", exclude_none=True),
        CLIENT_CAPABILITIES_META_KEY: capabilities,
    }


def _with_progress(
    params: dict[str, Any], meta: dict[str, Any] | None, progress: ProgressFnT | None
) -> dict[str, Any]:
    if progress is not None:
        meta = {**(meta or {}), "progressToken": PROGRESS_TOKEN}
    return {**params, "_meta": meta} if meta else params


def _sink(wire: Wire, progress: ProgressFnT | None, log: LogSink | None = None) -> MessageSink | None:
    """Where a call's other messages go: its own progress to `progress`, its log messages to `log` (in
    order, before the answer: a 2026-07-28 caller's stream ends with it), the rest to the SDK session."""
    if progress is None and log is None:
        return None  # the wire hands everything to the session

    async def deliver(message: dict[str, Any]) -> None:
        params = message.get("params")
        if log is not None and message.get("method") == "notifications/message" and isinstance(params, dict):
            await log(params)
        elif (
            progress is not None
            and message.get("method") == "notifications/progress"
            and isinstance(params, dict)
            and params.get("progressToken") == PROGRESS_TOKEN
            and isinstance(params.get("progress"), int | float)
        ):
            total, text = params.get("total"), params.get("message")
            await progress(
                params["progress"],
                total if isinstance(total, int | float) else None,
                text if isinstance(text, str) else None,
            )
        else:
            await wire.inject(message)

    return deliver
