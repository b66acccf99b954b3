"""One parked upstream call of the era bridge (era_bridge.py) and the requests it waits on.

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

import itertools
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import anyio
import mcp_types as types
from mcp.shared.dispatcher import ProgressFnT
from pydantic import BaseModel, ValidationError

from scailink_mcp.errors import ScaiLinkError

METHOD_NOT_FOUND = -32601
# The short names of the parked requests' keys in `inputRequests` (`sampling_1`, ...).
CAPABILITY_KEYS = {"sampling": "sampling", "elicitation": "elicitation", "roots": "roots"}


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
