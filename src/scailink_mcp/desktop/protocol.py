"""The desktop bridge wire protocol: pydantic models of every frame, validation, close codes.

JSON-RPC 2.0 text frames over a WebSocket. Validation errors name the failing field (they become the
close reason of a 4002), never echo values. A binary frame is `BinaryFrame` (close 1003); a frame that
nests deeper than the configured depth is refused before it is parsed (`json.loads` would recurse).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from enum import IntEnum
from typing import Annotated, Any, Literal

import mcp_types as types
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from scailink_mcp.jsondepth import too_deep

PROTOCOL_VERSIONS = ("scailink/1.0",)
JSONRPC = "2.0"

INIT = "scailink/session_init"
HEARTBEAT = "scailink/heartbeat"
CATALOG_UPDATE = "scailink/catalog_update"
CONSENT_RESPONSE = "scailink/consent_response"
TERMINATE = "scailink/session_terminate"
PROGRESS = "scailink/progress"
TOOL_INVOKE = "scailink/tool_invoke"
RESOURCE_READ = "scailink/resource_read"
PROMPT_GET = "scailink/prompt_get"
CONSENT_REQUEST = "scailink/consent_request"
POLICY_UPDATE = "scailink/policy_update"
CLIENT_NOTIFICATIONS = frozenset({HEARTBEAT, CATALOG_UPDATE, CONSENT_RESPONSE, TERMINATE, PROGRESS})
MAX_ITEMS = "max_items"  # validation-context key bounding `CatalogUpdate` lists


class Close(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    UNSUPPORTED_DATA = 1003
    TOO_BIG = 1009
    UNAUTHORIZED = 4001
    BAD_INIT = 4002
    PROTOCOL = 4003
    LIVENESS = 4008
    TOO_MANY = 4009
    REPLACED = 4010


class FrameError(ValueError):
    """A frame that is not acceptable; `reason` is safe to send as a close reason (<= 123 bytes)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason[:120]


class BinaryFrame(FrameError):
    """A binary WebSocket frame: the protocol is JSON-RPC text frames only (close 1003)."""

    def __init__(self) -> None:
        super().__init__("binary frames are not supported: send JSON-RPC text frames")


def wire_items(model: type[BaseModel], what: str) -> Callable[[list[dict[str, Any]], ValidationInfo], Any]:
    """A validator: every item must be `model` in MCP wire shape; the error names the first bad index."""

    def check(value: list[dict[str, Any]], info: ValidationInfo) -> list[dict[str, Any]]:
        for index, item in enumerate(value):
            try:
                model.model_validate(item)
            except ValidationError:
                raise ValueError(f"{info.field_name}[{index}] is not an MCP {what}") from None
        return value

    return check


# Lists of MCP items in wire shape (each checked, the frame's dicts kept as sent).
ToolList = Annotated[list[dict[str, Any]], AfterValidator(wire_items(types.Tool, "tool"))]
TemplateList = Annotated[
    list[dict[str, Any]], AfterValidator(wire_items(types.ResourceTemplate, "resource template"))
]


class Platform(BaseModel):
    model_config = ConfigDict(extra="allow")

    os: str = Field(min_length=1, max_length=64)
    arch: str | None = Field(default=None, max_length=64)
    version: str | None = Field(default=None, max_length=128)


class Capabilities(BaseModel):
    tools: ToolList = Field(default_factory=list, max_length=2000)
    resources: list[dict[str, Any]] = Field(default_factory=list, max_length=2000)
    prompts: list[dict[str, Any]] = Field(default_factory=list, max_length=2000)
    resource_templates: TemplateList = Field(default_factory=list, max_length=2000)


class SessionInit(BaseModel):
    protocol_version: str
    client_version: str = Field(min_length=1, max_length=64)
    device_name: str = Field(min_length=1, max_length=128)
    device_id: str | None = Field(default=None, min_length=1, max_length=128)
    platform: Platform
    capabilities: Capabilities
    audit_detail_level: Literal["off", "metadata"] = "metadata"
    resume_session_id: str | None = Field(default=None, max_length=64)

    @field_validator("protocol_version")
    @classmethod
    def _version(cls, value: str) -> str:
        if value not in PROTOCOL_VERSIONS:
            raise ValueError(f"unsupported protocol_version (supported: {', '.join(PROTOCOL_VERSIONS)})")
        return value


class CatalogUpdate(BaseModel):
    """`added`/`removed` are bounded by `max_items` of the validation context (the bridge passes
    `ws_max_tools_per_session`): the length is checked before any item is validated, so a frame
    holding hundreds of thousands of items is refused at the cost of one `len`."""

    added: ToolList = Field(default_factory=list)
    removed: list[str] = Field(default_factory=list)

    @field_validator("added", "removed", mode="before")
    @classmethod
    def _bounded(cls, value: Any, info: ValidationInfo) -> Any:
        limit = (info.context or {}).get(MAX_ITEMS)
        if isinstance(value, list) and isinstance(limit, int) and len(value) > limit:
            raise ValueError(f"more than {limit} items (ws_max_tools_per_session)")
        return value


class ConsentResponse(BaseModel):
    consent_id: str
    decision: Literal["approved", "denied"]
    remember: Literal["once", "session"] = "once"


class Progress(BaseModel):
    """`scailink/progress`: the device's progress on one `tool_invoke` that asked for it
    (`progress: true`), relayed to the caller's `progressToken`. A progress for an invocation that is
    over (or never asked) is dropped: it can cross the answer on the wire."""

    invocation_id: str = Field(min_length=1, max_length=64)
    progress: float = Field(allow_inf_nan=False)
    total: float | None = Field(default=None, allow_inf_nan=False)
    message: str | None = Field(default=None, max_length=1000)


def first_error_field(exc: ValidationError) -> str:
    err = exc.errors(include_input=False, include_url=False)[0]
    field = ".".join(str(p) for p in err["loc"]) or "params"
    return f"{field}: {err['msg']}"


def parse_frame(text: str | bytes, max_depth: int | None = None) -> dict[str, Any]:
    """A JSON-RPC 2.0 message object, else `FrameError` (also for nesting deeper than `max_depth`)."""
    if max_depth is not None and too_deep(text, max_depth):
        raise FrameError(f"frame nests deeper than {max_depth} levels (max_json_depth)")
    try:
        message = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise FrameError("frame is not valid JSON") from None
    except RecursionError:
        raise FrameError("frame nests too deeply") from None
    if not isinstance(message, dict) or message.get("jsonrpc") != JSONRPC:
        raise FrameError("frame is not a JSON-RPC 2.0 message")
    return message


def parse_init(message: dict[str, Any]) -> SessionInit:
    if message.get("method") != INIT or "id" not in message:
        raise FrameError("first frame must be a scailink/session_init request")
    params = message.get("params")
    if not isinstance(params, dict):
        raise FrameError("params: must be an object")
    try:
        return SessionInit.model_validate(params)
    except ValidationError as exc:
        raise FrameError(first_error_field(exc)) from None


def request(request_id: str, method: str, params: dict[str, Any]) -> str:
    return json.dumps({"jsonrpc": JSONRPC, "id": request_id, "method": method, "params": params})


def notification(method: str, params: dict[str, Any]) -> str:
    return json.dumps({"jsonrpc": JSONRPC, "method": method, "params": params})


def result(request_id: Any, value: dict[str, Any]) -> str:
    return json.dumps({"jsonrpc": JSONRPC, "id": request_id, "result": value})


def error(request_id: Any, code: int, message: str) -> str:
    return json.dumps({"jsonrpc": JSONRPC, "id": request_id, "error": {"code": code, "message": message}})
