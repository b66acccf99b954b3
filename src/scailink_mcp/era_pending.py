"""What the era bridge (era_bridge.py) keeps of a 2026-07-28 call: the caller's request (`EraCall`),
and a parked upstream call with the requests it waits on (`PendingCall`, `Question`).

A handshake-era upstream asks its client (ScaiLink's pooled session) for sampling, elicitation or
roots while it serves a call. When the downstream caller is a 2026-07-28 client there is no
back-channel to ask it on: the relay (relay.py) hands each such request to the call's `PendingCall`
instead (`ask`), which parks it as a `Question` until the client's retry brings the answer. The
upstream call itself keeps running in the bridge's task group meanwhile.

Must not: block the relay forever (a question waits as long as the upstream call it belongs to, which
the pool bounds with its timeout), nor hand a question to a client that did not declare the
capability (answered -32601 as the relay does for handshake-era clients).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import mcp_types as types
from mcp.shared.dispatcher import ProgressFnT
from mcp_types import (
    CLIENT_CAPABILITIES_META_KEY,
    CLIENT_INFO_META_KEY,
    PROTOCOL_VERSION_META_KEY,
    SERVER_INFO_META_KEY,
)
from mcp_types.version import LATEST_MODERN_VERSION, MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, ValidationError

from scailink_mcp.errors import ScaiLinkError
from scailink_mcp.remote.upstream import CLIENT_INFO

if TYPE_CHECKING:
    from mcp.server.context import ServerRequestContext

ENVELOPE_KEYS = frozenset({PROTOCOL_VERSION_META_KEY, CLIENT_INFO_META_KEY})
PROGRESS_KEYS = frozenset({"progressToken", "progress_token"})
METHOD_NOT_FOUND = -32601
Result = dict[str, Any]
# The short names of the parked requests' keys in `inputRequests` (`sampling_1`, ...).
CAPABILITY_KEYS = {"sampling": "sampling", "elicitation": "elicitation", "roots": "roots"}


class EraCall:
    """What a 2026-07-28 request brings to a call: the client's `_meta` (its declared capabilities
    among it) and the multi-round-trip fields of a retry, as they came on the wire."""

    def __init__(self, params: Mapping[str, Any], downstream: object | None = None) -> None:
        meta = params.get("_meta")
        self.meta: dict[str, Any] = dict(meta) if isinstance(meta, Mapping) else {}
        caps = self.meta.get(CLIENT_CAPABILITIES_META_KEY)
        self.capabilities: dict[str, Any] = dict(caps) if isinstance(caps, Mapping) else {}
        self.input_responses: object = params.get("inputResponses")
        self.request_state: object = params.get("requestState")
        self.downstream = downstream  # relay.DownstreamCall: where the upstream's log messages go

    def upstream_params(self, base: Result) -> Result:
        """`base` with the 2026-07-28 envelope (ScaiLink as the client, the caller's capabilities and
        other `_meta` entries) and the retry fields unchanged."""
        meta = {k: v for k, v in self.meta.items() if k not in ENVELOPE_KEYS | PROGRESS_KEYS}
        meta[PROTOCOL_VERSION_META_KEY] = LATEST_MODERN_VERSION
        meta[CLIENT_INFO_META_KEY] = CLIENT_INFO.model_dump(mode="json", exclude_none=True)
        meta[CLIENT_CAPABILITIES_META_KEY] = self.capabilities
        params = {**base, "_meta": meta}
        if self.input_responses is not None:
            params["inputResponses"] = self.input_responses
        if self.request_state is not None:
            params["requestState"] = self.request_state
        return params


def digest(arguments: object) -> str:
    """What a sealed `requestState` binds of a call's arguments."""
    text = json.dumps(arguments or {}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def without_server_info(result: Result) -> Result:
    """A 2026-07-28 upstream's result less its `serverInfo` stamp (the answer is ScaiLink's)."""
    meta = result.get("_meta")
    if isinstance(meta, dict) and SERVER_INFO_META_KEY in meta:
        rest = {k: v for k, v in meta.items() if k != SERVER_INFO_META_KEY}
        return {**{k: v for k, v in result.items() if k != "_meta"}, **({"_meta": rest} if rest else {})}
    return result


def era_call(ctx: ServerRequestContext[Any, Any], downstream: object | None = None) -> EraCall | None:
    """The request's `EraCall` when it is of the 2026-07-28 era, else None (handshake era)."""
    if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
        return None
    return EraCall(ctx.params or {}, downstream)


@dataclass(eq=False)
class Question:
    """One server-to-client request of the upstream, as it goes out in `inputRequests`."""

    method: str
    params: dict[str, Any]
    result_type: type[BaseModel]
    answered: anyio.Event = field(default_factory=anyio.Event)
    answer: Any = None

    def settle(self, raw: object) -> bool:
        """Take the client's input response; False (asked again) when it is not the expected shape."""
        try:
            self.answer = self.result_type.model_validate(raw)
        except ValidationError:
            return False
        self.answered.set()
        return True


@dataclass(eq=False)
class PendingCall:
    """A call in flight upstream on behalf of a 2026-07-28 client, between its rounds.

    `capabilities` are what the client declared (its request's `_meta`); `binding` is what a sealed
    `requestState` of this call must match (user, tenant, server, method, name, arguments digest).
    `downstream` and `progress` are the current round's (None between rounds): log messages and
    progress of the upstream go there while a round waits.
    """

    id: str
    binding: dict[str, str]
    capabilities: dict[str, Any]
    questions: dict[str, Question] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: ScaiLinkError | None = None
    done: bool = False
    downstream: object | None = None
    progress: ProgressFnT | None = None
    taken: anyio.Event = field(default_factory=anyio.Event)
    _wake: anyio.Event = field(default_factory=anyio.Event)
    _count: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def fresh_wake(self) -> anyio.Event:
        """An event set by the next change (a question, the end of the call); take it before checking."""
        self._wake = anyio.Event()
        return self._wake

    def changed(self) -> None:
        self._wake.set()

    def unanswered(self) -> dict[str, Question]:
        return {key: q for key, q in self.questions.items() if not q.answered.is_set()}

    def finish(self, result: dict[str, Any] | None, error: ScaiLinkError | None) -> None:
        self.result, self.error, self.done = result, error, True
        self.changed()

    async def ask(self, request: Any, result_type: type[BaseModel], capability: str) -> Any:
        """The relay's callback: park `request` until the client answers it in a retry."""
        if capability not in self.capabilities:
            return types.ErrorData(
                code=METHOD_NOT_FOUND, message=f"the calling client does not support {capability}"
            )
        params = (
            request.params.model_dump(by_alias=True, mode="json", exclude_none=True) if request.params else {}
        )
        key = f"{CAPABILITY_KEYS.get(capability, capability)}_{next(self._count)}"
        question = Question(request.method, params, result_type)
        self.questions[key] = question
        self.changed()
        await question.answered.wait()
        return question.answer

    async def relay_progress(self, progress: float, total: float | None, message: str | None) -> None:
        """The upstream's progress, to the round waiting now (dropped between rounds)."""
        relay = self.progress
        if relay is not None:
            with suppress(Exception):
                await relay(progress, total, message)
