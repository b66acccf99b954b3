"""The desktop client's answers to ScaiLink: the frames the server sends, and what goes back.

Owns: the client-side shapes of the server's frames (`session_init_ack`, `tool_invoke`,
`resource_read`, `prompt_get`, `consent_request`; unknown fields ignored), and `FrameResponder`,
which answers one frame: a call within a deadline a little under its `timeout_ms`, as a JSON-RPC
result or error (an answer over the frame limit becomes an error), a consent request through the
`ConsentPrompter` within its `expires_ms`. A `tool_invoke` with `progress: true` relays the local
server's progress notifications as `scailink/progress` frames until the answer.

Must not: hold the connection (it is handed a `send`), or log tool arguments or answers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
from mcp.shared.exceptions import MCPError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from scailink_mcp.desktop import protocol
from scailink_mcp.desktop.consent_prompt import ConsentPrompter, Decision, Remember
from scailink_mcp.desktop.local_servers import LocalServers, UnknownItem

logger = logging.getLogger(__name__)

MAX_FRAME_BYTES = 1024 * 1024  # the bridge closes 1009 above this: a bigger answer becomes an error

# JSON-RPC error codes of the answers to the server's requests (-32000..-32003: the local side's).
TOOL_FAILED = -32000
TOOL_TIMEOUT = -32001
NOT_FOUND = -32002
TOO_LARGE = -32003
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602

Send = Callable[[str], Awaitable[bool]]


def answer_deadline_s(timeout_ms: int) -> float:
    """How long a local call may take: a little less than the caller's timeout, so the answer (or the
    timeout error) arrives while ScaiLink still waits for it rather than after it gave up."""
    timeout = timeout_ms / 1000
    return max(0.05, timeout - min(1.0, timeout * 0.1))


def json_object(raw: str | bytes) -> dict[str, Any] | None:
    """A frame's JSON object, or None for anything else (not JSON, or not an object)."""
    try:
        message = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return message if isinstance(message, dict) else None


# ---- wire shapes of what the server sends ---------------------------------------------------------


class _Params(BaseModel):
    model_config = ConfigDict(extra="ignore")


class SessionAck(_Params):
    session_id: str = Field(min_length=1)
    heartbeat_interval_ms: int = Field(default=30000, gt=0)
    grace_period_ms: int = 120000
    rejected: list[Any] = Field(default_factory=list)
    namespace: str | None = None


class _Call(_Params):
    invocation_id: str | None = None
    timeout_ms: int = Field(default=60000, gt=0)


class ToolInvoke(_Call):
    tool: str
    arguments: dict[str, Any] | None = None
    progress: bool = False  # the caller wants progress: `scailink/progress` frames while it runs


class ResourceRead(_Call):
    uri: str


class PromptGet(_Call):
    name: str
    arguments: dict[str, str] | None = None


class ConsentRequest(_Params):
    consent_id: str
    tool: str
    arguments: Any = None
    expires_ms: int | None = Field(default=None, gt=0)


C = TypeVar("C", bound=_Call)


# ---- the answers ------------------------------------------------------------------------------------


class FrameResponder:
    """Answers the server's frames with the local servers of `local` and the prompter `consent`."""

    def __init__(self, local: LocalServers, consent: ConsentPrompter) -> None:
        self.local = local
        self.consent = consent

    async def handle(self, raw: str | bytes, send: Send) -> None:
        """One frame, in its own task: a slow tool never holds up heartbeats or other calls."""
        message = json_object(raw)
        if message is None:
            logger.warning("ignored a frame that is not a JSON object")
            return
        method, params = message.get("method"), message.get("params") or {}
        if "id" not in message:
            if method == protocol.CONSENT_REQUEST:
                await self._consent(params, send)
            elif method == protocol.POLICY_UPDATE:
                logger.info("policy update from ScaiLink", extra={"policy": json.dumps(params)[:500]})
            return  # other notifications: nothing to do
        request_id = message["id"]
        if method is None:
            return  # a response: this client sends no requests after session_init
        if method == protocol.TOOL_INVOKE:
            reply = await self._answer(request_id, ToolInvoke, params, lambda r: self._call_tool(r, send))
        elif method == protocol.RESOURCE_READ:
            reply = await self._answer(request_id, ResourceRead, params, self._read_resource)
        elif method == protocol.PROMPT_GET:
            reply = await self._answer(request_id, PromptGet, params, self._get_prompt)
        else:
            reply = protocol.error(request_id, METHOD_NOT_FOUND, f"unknown method {str(method)[:60]!r}")
        if len(reply) > MAX_FRAME_BYTES // 4 and len(reply.encode()) > MAX_FRAME_BYTES:
            reply = protocol.error(
                request_id, TOO_LARGE, f"the answer is over the {MAX_FRAME_BYTES}-byte frame limit"
            )
        await send(reply)

    async def _answer(
        self, request_id: Any, shape: type[C], params: Any, call: Callable[[C], Awaitable[BaseModel]]
    ) -> str:
        try:
            request = shape.model_validate(params)
        except ValidationError as exc:
            return protocol.error(
                request_id, INVALID_PARAMS, f"invalid params: {protocol.first_error_field(exc)}"
            )
        deadline = answer_deadline_s(request.timeout_ms)
        try:
            with anyio.fail_after(deadline):
                result = await call(request)
        except UnknownItem as exc:
            return protocol.error(request_id, NOT_FOUND, str(exc))
        except TimeoutError:
            return protocol.error(
                request_id, TOOL_TIMEOUT, f"the local server did not answer within {deadline:g} s"
            )
        except MCPError as exc:
            return protocol.error(request_id, TOOL_FAILED, f"the local server answered: {exc.message[:200]}")
        except Exception as exc:
            logger.warning("a local call failed", extra={"error": repr(exc)})
            return protocol.error(request_id, TOOL_FAILED, f"the local server failed ({type(exc).__name__})")
        return protocol.result(request_id, result.model_dump(by_alias=True, exclude_none=True, mode="json"))

    async def _call_tool(self, request: ToolInvoke, send: Send) -> BaseModel:
        invocation_id = request.invocation_id
        if not request.progress or invocation_id is None:
            return await self.local.call_tool(request.tool, request.arguments)

        async def relay(progress: float, total: float | None, message: str | None) -> None:
            frame = {"invocation_id": invocation_id, "progress": progress, "total": total, "message": message}
            await send(protocol.notification(protocol.PROGRESS, frame))

        return await self.local.call_tool(request.tool, request.arguments, progress=relay)

    async def _read_resource(self, request: ResourceRead) -> BaseModel:
        return await self.local.read_resource(request.uri)

    async def _get_prompt(self, request: PromptGet) -> BaseModel:
        return await self.local.get_prompt(request.name, request.arguments)

    async def _consent(self, params: Any, send: Send) -> None:
        try:
            request = ConsentRequest.model_validate(params)
        except ValidationError as exc:
            logger.warning(
                "ignored a malformed consent_request", extra={"error": protocol.first_error_field(exc)}
            )
            return
        decision: Decision = "denied"
        remember: Remember = "once"
        with anyio.move_on_after(request.expires_ms / 1000 if request.expires_ms else None) as scope:
            try:
                decision, remember = await self.consent(request.tool, request.arguments)
            except Exception as exc:
                logger.warning("the consent prompter failed: denied", extra={"error": repr(exc)})
        if scope.cancelled_caught:
            logger.info("a consent request expired unanswered", extra={"tool": request.tool})
            return  # the server has already counted the silence as a denial
        if decision != "approved":
            decision, remember = "denied", "once"
        response = {
            "consent_id": request.consent_id,
            "decision": decision,
            "remember": remember if remember in ("once", "session") else "once",
        }
        await send(protocol.notification(protocol.CONSENT_RESPONSE, response))
