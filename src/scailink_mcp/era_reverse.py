"""The era bridge's other direction (issue 15): an upstream's own `input_required` answered on behalf
of a handshake-era caller, by asking that caller over its session's back-channel.

A 2026-07-28 upstream asks for its client's input mid-call by answering `input_required` (SEP-2322)
with `inputRequests` (sampling, elicitation, roots) and a `requestState`. A handshake-era client
through ScaiLink cannot read that result: ScaiLink sends each request to it as a server-to-client
request of its own call (`relay.Downstream.ask`: the SDK session's `send_request`, related to the
call), collects the answers as
`inputResponses` and calls the upstream again with them and the upstream's `requestState`
(unchanged: the upstream sealed it), for at most `MAX_ROUNDS` rounds.

When a handshake-era caller's call goes to the upstream in the 2026-07-28 era: when the upstream
speaks only that era (it refuses `initialize`; `upstream.open_session` then adopts its
`server/discover` and the pooled session sends every call in that era, declaring the caller's own
capabilities, `pooled_session.py`). An upstream that speaks both eras is called in the caller's era,
as a direct client would be: on its warm handshake-era session (the hot path), where it asks over
its back-channel (`relay.py` forwards that); if it answers `input_required` there anyway (an SDK
server does not: it refuses to send that result in the handshake era), the same rounds answer it.
`prompts/get` and `resources/read` of a handshake-era caller take the same rounds (`request`).

Must not: ask a caller for a capability it did not declare (the call ends with a tool error naming
what is missing, `ClientCapabilityMissing`), hang (every question is bounded by the call's timeout,
and the rounds by `MAX_ROUNDS`), or be entered by a `tools/call` whose answer is not `input_required`
(`RemoteTarget.call` sends the first round itself and hands only such an answer here, `first`; the
caller's capabilities are worked out only when an upstream needs them).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import mcp_types as types
from mcp.client.session import ClientSession
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError
from pydantic import BaseModel, TypeAdapter, ValidationError

from scailink_mcp.errors import ClientCapabilityMissing, UpstreamError, UpstreamTimeout
from scailink_mcp.relay import BACK_CHANNEL, Downstream, DownstreamCall
from scailink_mcp.remote.pool import PoolKey, UpstreamPool

logger = logging.getLogger(__name__)

Result = dict[str, Any]
# Rounds of `input_required` answered for one call before it ends with a tool error.
MAX_ROUNDS = 8
# Input requests answered in one round: each is a question to the client, asked in turn, so an upstream
# must not make a round of thousands (the round ends with a tool error before anything is asked).
MAX_INPUT_REQUESTS = 16
# The capability a client must declare for each kind of input request, and the answer's type.
CAPABILITY_OF: dict[str, tuple[str, type[BaseModel]]] = {
    "sampling/createMessage": ("sampling", types.CreateMessageResult),
    "elicitation/create": ("elicitation", types.ElicitResult),
    "roots/list": ("roots", types.ListRootsResult),
}
_REQUEST: TypeAdapter[types.InputRequest] = TypeAdapter(types.InputRequest)
# The other methods with rounds: the request, its params and its result types.
REQUESTS: dict[str, tuple[Any, type[types.InputResponseRequestParams], TypeAdapter[Any]]] = {
    "prompts/get": (
        types.GetPromptRequest,
        types.GetPromptRequestParams,
        TypeAdapter(types.GetPromptResult | types.InputRequiredResult),
    ),
    "resources/read": (
        types.ReadResourceRequest,
        types.ReadResourceRequestParams,
        TypeAdapter(types.ReadResourceResult | types.InputRequiredResult),
    ),
}


def asks_for_input(result: Mapping[str, Any]) -> bool:
    return result.get("resultType") == "input_required"


def caller_capabilities(relay: Downstream | None) -> dict[str, Any]:
    """What the downstream client declared at `initialize` (nothing for a caller without a session;
    the `/mcp` front serves only sessions that declared none of these)."""
    if isinstance(relay, DownstreamCall):
        caps = relay.session.client_capabilities
        dumped: dict[str, Any] = (
            caps.model_dump(by_alias=True, mode="json", exclude_none=True) if caps else {}
        )
        return dumped
    return {c: {} for c in BACK_CHANNEL if relay is not None and relay.supports(c)}


class ReverseBridge:
    """Calls a tool for a handshake-era caller, answering the upstream's `input_required` rounds."""

    def __init__(self, pool: UpstreamPool, *, max_rounds: int = MAX_ROUNDS) -> None:
        self.pool = pool
        self.max_rounds = max_rounds

    async def call_tool(
        self,
        key: PoolKey,
        name: str,
        arguments: dict[str, Any] | None,
        relay: Downstream | None,
        *,
        timeout: float,
        progress: ProgressFnT | None,
        first: Result | None = None,
    ) -> Result:
        """`first`: the answer of the call's first round when the caller sent it itself
        (`RemoteTarget.call`, so that a call not asking for input never enters this module); the
        rounds then start by answering it."""
        caps: dict[str, Any] | None = None  # worked out only when needed: not on the warm path

        def capabilities() -> dict[str, Any]:
            nonlocal caps
            if caps is None:
                caps = caller_capabilities(relay)
            return caps

        def send(retry: dict[str, Any] | None) -> Awaitable[Result]:
            return self.pool.call_tool(
                key,
                name,
                arguments,
                timeout=timeout,
                progress_callback=progress,
                relay=relay,
                retry=retry,
                capabilities=capabilities,
            )

        return await self._rounds(send, relay, capabilities, timeout, first)

    async def request(
        self,
        key: PoolKey,
        method: str,
        params: dict[str, Any],
        relay: Downstream | None,
        *,
        timeout: float,
    ) -> Result:
        """`prompts/get` or `resources/read` on the pooled session's SDK client, with the same rounds
        (a 2026-07-28-only upstream's session declares ScaiLink's capabilities there, the SDK stamps
        them; a request for one the caller lacks still ends in `ClientCapabilityMissing`)."""
        request_type, params_type, result_type = REQUESTS[method]

        def send(retry: dict[str, Any] | None) -> Awaitable[Result]:
            request = request_type(params=params_type.model_validate({**params, **(retry or {})}))

            async def on(session: ClientSession) -> Result:
                answer = await session.send_request(request, result_type)
                dumped: Result = answer.model_dump(by_alias=True, mode="json", exclude_none=True)
                return dumped

            return self.pool.use(key, on, timeout=timeout, relay=relay)

        return await self._rounds(send, relay, lambda: caller_capabilities(relay), timeout)

    async def _rounds(
        self,
        send: Callable[[dict[str, Any] | None], Awaitable[Result]],
        relay: Downstream | None,
        caps: Callable[[], Mapping[str, Any]],
        timeout: float,
        first: Result | None = None,
    ) -> Result:
        retry: dict[str, Any] | None = None
        for rounds in range(self.max_rounds + 1):  # the call, then one retry per round answered
            result = first if rounds == 0 and first is not None else await send(retry)
            if not asks_for_input(result):
                return result
            if rounds == self.max_rounds:
                break
            retry = await self._answer(result, relay, caps(), timeout)
        raise UpstreamError(
            f"the upstream asked for input more than {self.max_rounds} rounds in one call; the call was ended"
        )

    async def _answer(
        self, result: Result, relay: Downstream | None, caps: Mapping[str, Any], timeout: float
    ) -> dict[str, Any]:
        """One round: every input request asked of the caller; the retry's fields."""
        requests = result.get("inputRequests") or {}  # a state alone is a retry with no answers
        state = result.get("requestState")
        if not isinstance(requests, Mapping) or (not requests and not isinstance(state, str)):
            raise UpstreamError("the upstream answered input_required without inputRequests or requestState")
        if len(requests) > MAX_INPUT_REQUESTS:
            raise UpstreamError(
                f"the upstream asked for {len(requests)} inputs at once "
                f"(at most {MAX_INPUT_REQUESTS} are relayed)"
            )
        parsed: dict[str, types.InputRequest] = {}
        for key, raw in requests.items():
            try:
                parsed[str(key)] = _REQUEST.validate_python(raw, by_name=False)
            except ValidationError:
                raise UpstreamError(
                    f"the upstream's input request {key!r} is not one ScaiLink knows"
                ) from None
        missing = sorted(
            {CAPABILITY_OF[q.method][0] for q in parsed.values() if CAPABILITY_OF[q.method][0] not in caps}
        )
        if missing or (parsed and relay is None):
            names = ", ".join(missing or sorted({CAPABILITY_OF[q.method][0] for q in parsed.values()}))
            raise ClientCapabilityMissing(
                f"the upstream needs the client's {names} to go on, and this client did not declare "
                f"{'it' if len(missing) <= 1 else 'them'} (a client that declares {names} at initialize "
                "is asked over its session)",
                details={"missing": missing or names.split(", ")},
            )
        answers: dict[str, Any] = {}
        for key, question in parsed.items():
            assert relay is not None  # checked above: no questions without a session to ask
            answers[key] = await self._ask(relay, question, timeout)
        retry: dict[str, Any] = {"inputResponses": answers}
        if isinstance(state, str):
            retry["requestState"] = state
        return retry

    async def _ask(self, relay: Downstream, question: types.InputRequest, timeout: float) -> Any:
        capability, answer_type = CAPABILITY_OF[question.method]
        try:
            with anyio.fail_after(timeout):
                answer = await relay.ask(question, answer_type)
        except TimeoutError:
            raise UpstreamTimeout(
                f"the client did not answer the {capability} request within {timeout:g} s"
            ) from None
        except MCPError as exc:
            # The client refused (or has no back-channel after all): `inputResponses` has no place for
            # an error, so the call ends here with the client's reason.
            raise ClientCapabilityMissing(
                f"the client refused the upstream's {capability} request ({exc.error.message})",
                details={"missing": [capability]},
            ) from None
        except ValidationError:
            raise UpstreamError(f"the client's answer to the {capability} request is invalid") from None
        return answer.model_dump(by_alias=True, mode="json", exclude_none=True)
