"""The era bridge: a 2026-07-28 client's call through ScaiLink to a remote server (issue 15).

The 2026-07-28 era is sessionless: a server that needs its client's input mid-call (sampling,
elicitation, roots) answers `input_required` (SEP-2322, multi-round-trip) and the client retries
with `inputResponses` and the opaque `requestState`. Per `tools/call` or `prompts/get`:

- An upstream that speaks 2026-07-28 (asked once per server with `server/discover`, remembered in
  memory until the server's sessions are closed by a registry event) is called in that era, over the
  pooled session's HTTP client (its credentials, SSRF guard and answer bound). Its result, an
  `input_required` one included, reaches the client unchanged (less the upstream's `serverInfo`
  stamp: the answer is ScaiLink's), and the retry's `inputResponses` and `requestState` (sealed by
  the upstream itself) go to it unchanged; its JSON-RPC errors come back as they were.
- A handshake-era upstream is called on the pooled session as for any client. Server-to-client
  requests it sends meanwhile have no back-channel to a 2026-07-28 client, so the relay parks them on
  the call's `PendingCall` (era_pending.py) while the upstream call keeps running in the bridge's
  task group. The client gets `input_required` with them and a `requestState` sealed by ScaiLink
  (`scailink.` + AES-256-GCM under a key derived from the cluster secret, so every replica can read
  it), bound to the user, the server, the method, the name and the arguments, naming the call and the
  replica that holds it. Its retry answers the parked requests and waits for the next round: the
  upstream's result, or its next requests.

Several replicas: the upstream call stays on the replica whose task holds it (its HTTP request is in
flight there). A retry landing elsewhere is checked there and forwarded over Redis to that replica
(era_cluster.py), which runs the round; without Redis it is refused with a JSON-RPC error saying so.

Bad input: a forged, tampered, expired or foreign `requestState` is -32602 "Invalid or expired
requestState" (the SDK's wording), never a 500 or a hang; a missing or malformed input response
re-asks that request in a new `input_required`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from typing import TYPE_CHECKING, Any, NoReturn

import anyio
import anyio.abc
import mcp_types as types
from mcp.server.request_state import AESGCMRequestStateCodec, InvalidRequestState
from mcp.shared.dispatcher import ProgressFnT
from mcp_types import INVALID_PARAMS
from mcp_types.version import LATEST_MODERN_VERSION
from pydantic import ValidationError

from scailink_mcp.era_pending import EraCall, PendingCall, digest, without_server_info
from scailink_mcp.era_reverse import ReverseBridge
from scailink_mcp.errors import ProtocolError, RateLimited, ScaiLinkError, UpstreamError, UpstreamTimeout
from scailink_mcp.events import ServerEvent
from scailink_mcp.redis_link import make_worker_id
from scailink_mcp.relay import DownstreamCall
from scailink_mcp.remote.pool import PoolKey, UpstreamPool

if TYPE_CHECKING:
    from scailink_mcp.auth import Principal
    from scailink_mcp.era_cluster import EraCluster

logger = logging.getLogger(__name__)

Result = dict[str, Any]
STATE_PREFIX = "scailink."
# Server-to-client requests the upstream sends together go out in one round.
SETTLE_S = 0.02
# How long a finished call's result waits for the client's retry before it is dropped.
COLLECT_TTL_S = 120.0
# Parked calls per user at once (each holds an upstream request open until answered or timed out).
MAX_PENDING_PER_USER = 32


def invalid_state(reason: str) -> NoReturn:
    logger.info("requestState refused", extra={"reason": reason})
    raise ProtocolError(
        "Invalid or expired requestState", rpc_code=INVALID_PARAMS, data={"reason": "invalid_request_state"}
    )


def _log_to(downstream: object | None) -> Callable[[dict[str, Any]], Awaitable[None]] | None:
    """The upstream's log messages of a 2026-07-28 call, onto the caller's response stream (the SDK
    sends them only when the caller's `_meta` asked for that level: it passed to the upstream)."""
    if not isinstance(downstream, DownstreamCall):
        return None

    async def log(params: dict[str, Any]) -> None:
        with suppress(ValidationError):
            note = types.LoggingMessageNotification(
                params=types.LoggingMessageNotificationParams.model_validate(params)
            )
            await downstream.session.send_notification(note, related_request_id=downstream.request_id)

    return log


class EraBridge:
    """Built once per app; `run` (the app lifespan) owns the tasks of the parked upstream calls."""

    def __init__(
        self,
        pool: UpstreamPool,
        *,
        secret: bytes | None,
        pending_timeout_s: float,
        state_ttl_s: float = 600.0,
        cluster: EraCluster | None = None,
    ) -> None:
        self.pool = pool
        self.cluster = cluster  # several replicas: retries reach the replica holding the call
        self.worker_id = make_worker_id()  # made again in `run` (after any fork)
        # The upstream call behind a round waits for people (elicitation): the longest call timeout.
        self.pending_timeout_s = pending_timeout_s
        self.state_ttl_s = state_ttl_s
        self.max_pending = MAX_PENDING_PER_USER
        material = hashlib.sha256(b"scailink-mrtr-request-state" + (secret or os.urandom(32))).digest()
        self._codec = AESGCMRequestStateCodec([material])
        self._modern: dict[str, bool] = {}
        # Handshake-era callers: an upstream's own input_required asked over their back-channel.
        self.reverse = ReverseBridge(pool)
        self._pending: dict[str, PendingCall] = {}
        self._tg: anyio.abc.TaskGroup | None = None

    async def run(self) -> None:
        self.worker_id = make_worker_id()  # after any fork: the replica a requestState names
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                if self.cluster is not None:
                    tg.start_soon(self.cluster.run, self)
                await anyio.sleep_forever()
        finally:
            self._tg = None
            self._pending.clear()

    async def on_event(self, event: ServerEvent) -> None:
        """A changed endpoint or credential may change the era the server speaks: ask again."""
        if event.closes_sessions:
            self._modern.pop(event.server_id, None)

    def pending_count(self) -> int:
        return len(self._pending)

    # ---- the calls -------------------------------------------------------------------------------

    async def call_tool(
        self,
        key: PoolKey,
        principal: Principal,
        name: str,
        arguments: dict[str, Any] | None,
        era: EraCall,
        *,
        timeout: float,
        progress: ProgressFnT | None,
    ) -> Result:
        def handshake(pending: PendingCall) -> Awaitable[Result]:
            return self.pool.call_tool(
                key,
                name,
                arguments,
                timeout=self.pending_timeout_s,
                progress_callback=pending.relay_progress,
                relay=pending,
            )

        return await self._call(
            key, principal, "tools/call", name, arguments, era, timeout, progress, handshake
        )

    async def get_prompt(
        self,
        key: PoolKey,
        principal: Principal,
        name: str,
        arguments: dict[str, str] | None,
        era: EraCall,
        *,
        timeout: float,
    ) -> Result:
        async def handshake(pending: PendingCall) -> Result:
            result = await self.pool.use(
                key, lambda s: s.get_prompt(name, arguments), timeout=self.pending_timeout_s, relay=pending
            )
            dumped: Result = result.model_dump(by_alias=True, mode="json", exclude_none=True)
            return dumped

        return await self._call(key, principal, "prompts/get", name, arguments, era, timeout, None, handshake)

    async def read_resource(
        self, key: PoolKey, principal: Principal, uri: str, era: EraCall, *, timeout: float
    ) -> Result:
        async def handshake(pending: PendingCall) -> Result:
            result = await self.pool.use(
                key, lambda s: s.read_resource(uri), timeout=self.pending_timeout_s, relay=pending
            )
            dumped: Result = result.model_dump(by_alias=True, mode="json", exclude_none=True)
            return dumped

        return await self._call(key, principal, "resources/read", uri, None, era, timeout, None, handshake)

    async def _call(
        self,
        key: PoolKey,
        principal: Principal,
        method: str,
        name: str,
        arguments: Mapping[str, Any] | None,
        era: EraCall,
        timeout: float,
        progress: ProgressFnT | None,
        handshake: Callable[[PendingCall], Awaitable[Result]],
    ) -> Result:
        binding = {
            "u": principal.user_id,
            "t": principal.tenant_id,
            "s": key.server_id,
            "m": method,
            "n": name,
            "a": digest(arguments),
        }
        state = era.request_state
        if isinstance(state, str) and state.startswith(STATE_PREFIX):
            return await self._resume(state, binding, era, timeout, progress)
        if await self.speaks_modern(key, timeout):
            params: Result = {"uri": name} if method == "resources/read" else {"name": name}
            if arguments is not None:
                params["arguments"] = arguments
            result = await self.pool.call_modern(
                key,
                method,
                era.upstream_params(params),
                timeout=timeout,
                progress_callback=progress,
                log=_log_to(era.downstream),
            )
            return without_server_info(result)
        if state is not None:  # neither ScaiLink's nor the upstream's (it has no such era)
            invalid_state("a state for an upstream that speaks no 2026-07-28")
        pending = self._start(binding, era.capabilities, handshake)
        return await self._round(pending, era, timeout, progress)

    async def speaks_modern(self, key: PoolKey, timeout: float) -> bool:
        """Whether the server answers `server/discover` with 2026-07-28 (asked once, then remembered)."""
        known = self._modern.get(key.server_id)
        if known is not None:
            return known
        meta = EraCall({}).upstream_params({})
        try:
            answer = await self.pool.call_modern(key, "server/discover", meta, timeout=timeout)
            versions = answer.get("supportedVersions")
            modern = isinstance(versions, list) and LATEST_MODERN_VERSION in versions
        except ProtocolError:  # an error answer or a 4xx: a handshake-era server
            modern = False
        self._modern[key.server_id] = modern
        return modern

    # ---- parked calls ----------------------------------------------------------------------------

    def _start(
        self,
        binding: dict[str, str],
        capabilities: dict[str, Any],
        operation: Callable[[PendingCall], Awaitable[Result]],
    ) -> PendingCall:
        if self._tg is None:
            raise UpstreamError("the era bridge is not running")
        user = (binding["t"], binding["u"])
        if sum((p.binding["t"], p.binding["u"]) == user for p in self._pending.values()) >= self.max_pending:
            raise RateLimited(f"more than {self.max_pending} calls of this user are waiting for input")
        pending = PendingCall(secrets.token_urlsafe(16), binding, capabilities)
        self._pending[pending.id] = pending
        self._tg.start_soon(self._drive, pending, operation)
        return pending

    async def _drive(
        self, pending: PendingCall, operation: Callable[[PendingCall], Awaitable[Result]]
    ) -> None:
        """The upstream call, in the bridge's task group; its outcome waits for the client's retry."""
        try:
            try:
                result = await operation(pending)
            except ScaiLinkError as err:
                pending.finish(None, err)
            except Exception as exc:
                logger.info("bridged upstream call failed", extra={"error": type(exc).__name__})
                pending.finish(None, UpstreamError("the upstream call failed"))
            else:
                pending.finish(result, None)
            with anyio.move_on_after(COLLECT_TTL_S):
                await pending.taken.wait()
        finally:
            pending.done = True
            self._pending.pop(pending.id, None)

    async def _round(
        self, pending: PendingCall, era: EraCall, timeout: float, progress: ProgressFnT | None
    ) -> Result:
        """Wait for the upstream's result or its next requests (at most the call's timeout)."""
        pending.downstream, pending.progress = era.downstream, progress
        try:
            with anyio.fail_after(timeout):
                while not pending.done:
                    wake = pending.fresh_wake()
                    if pending.unanswered():
                        await anyio.sleep(SETTLE_S)
                        if not pending.done:
                            return self._input_required(pending)
                        break
                    await wake.wait()
        except TimeoutError:
            raise UpstreamTimeout(f"the upstream did not answer within {timeout:g} s") from None
        finally:
            pending.downstream = pending.progress = None
        pending.taken.set()
        if pending.error is not None:
            raise pending.error
        return pending.result or {}

    def _input_required(self, pending: PendingCall) -> Result:
        claims = {
            **pending.binding,
            "id": pending.id,
            "w": self.worker_id,
            "exp": time.time() + self.state_ttl_s,
        }
        requests = {key: {"method": q.method, "params": q.params} for key, q in pending.unanswered().items()}
        return {
            "resultType": "input_required",
            "inputRequests": requests,
            "requestState": STATE_PREFIX + self._codec.seal(json.dumps(claims).encode()),
        }

    async def _resume(
        self,
        state: str,
        binding: dict[str, str],
        era: EraCall,
        timeout: float,
        progress: ProgressFnT | None,
    ) -> Result:
        try:
            claims = json.loads(self._codec.unseal(state[len(STATE_PREFIX) :]))
        except (InvalidRequestState, ValueError, UnicodeDecodeError):
            invalid_state("seal")
        if not isinstance(claims, dict) or any(claims.get(k) != v for k, v in binding.items()):
            invalid_state("binding")
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or exp <= time.time():
            invalid_state("expired")
        owner = claims.get("w")
        responses = era.input_responses if isinstance(era.input_responses, Mapping) else {}
        if owner != self.worker_id:
            if self.cluster is None:
                raise ProtocolError(
                    "this call is pending on another ScaiLink replica, and without Redis a retry is not "
                    "forwarded: retry through the same replica, or start the call again",
                    rpc_code=INVALID_PARAMS,
                    data={"reason": "request_state_on_other_replica"},
                )
            body = {"id": claims.get("id"), "input_responses": dict(responses)}
            return await self.cluster.forward(str(owner), body, timeout)
        return await self._answer(str(claims.get("id")), responses, era, timeout, progress)

    async def resume_here(self, body: Mapping[str, Any], timeout: float) -> Result:
        """A peer's retry of a call parked here (era_cluster.py), its state checked by that peer."""
        responses = body.get("input_responses")
        answers = responses if isinstance(responses, Mapping) else {}
        return await self._answer(str(body.get("id")), answers, EraCall({}), timeout, None)

    async def _answer(
        self,
        pending_id: str,
        responses: Mapping[str, Any],
        era: EraCall,
        timeout: float,
        progress: ProgressFnT | None,
    ) -> Result:
        pending = self._pending.get(pending_id)
        if pending is None:
            invalid_state("no such pending call (finished, expired or its replica restarted)")
        for key, raw in responses.items():
            question = pending.questions.get(key)
            if question is not None and not question.answered.is_set():
                question.settle(raw)  # a malformed answer leaves it asked again
        return await self._round(pending, era, timeout, progress)
