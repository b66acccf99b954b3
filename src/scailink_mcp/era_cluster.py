"""A retry of a parked 2026-07-28 call, forwarded to the replica that holds it (SPEC section 10).

The era bridge parks a handshake-era upstream's call on the replica that started it: its upstream
request is in flight there. The sealed `requestState` names that replica; a retry landing on another
one is checked there (seal, user, target, arguments, expiry) and then sent, with the client's input
responses, to the owner's Redis inbox (`{prefix}:mrtr:{worker}`), which runs the round exactly as a
local retry does and answers on the caller's inbox. One subscription per worker, made at start-up;
replies resolve a waiter keyed by request id; every message is signed (`redis_link.Signer`).

Fail fast: when the publish reaches no subscriber (the owner is gone, so is its parked call) the retry
is -32602 "Invalid or expired requestState" at once; Redis unreachable is the same error, saying so.

Must not: run a round for a message that does not verify, nor wait past the round's timeout plus a
margin.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from scailink_mcp.errors import ProtocolError, ScaiLinkError, UpstreamTimeout, error_class
from scailink_mcp.redis_link import PeerLink, Subscription, connect

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from scailink_mcp.era_bridge import EraBridge

logger = logging.getLogger(__name__)

WIRE_VERSION = 1
REPLY_MARGIN_S = 2.0
Result = dict[str, Any]


@dataclass(eq=False)
class _Waiter:
    done: anyio.Event = field(default_factory=anyio.Event)
    result: Result | None = None
    error: ScaiLinkError | None = None


def _error_of(reply: dict[str, Any]) -> ScaiLinkError | None:
    error = reply.get("error")
    if not isinstance(error, dict):
        return None
    message = str(error.get("message", ""))[:500] or None
    if error.get("code") == ProtocolError.code:
        rpc = error.get("rpc_code")
        return ProtocolError(
            message, rpc_code=rpc if isinstance(rpc, int) else -32602, data=error.get("data")
        )
    return error_class(str(error.get("code")))(message)


def _error_body(err: ScaiLinkError) -> dict[str, Any]:
    body: dict[str, Any] = {"code": err.code, "message": err.message}
    if isinstance(err, ProtocolError):
        body |= {"rpc_code": err.rpc_code, "data": err.data}
    return body


class EraCluster:
    """One per worker, run inside `EraBridge.run` (so under the app lifespan) with the bridge's id."""

    def __init__(self, link: PeerLink) -> None:
        self.link = link
        self.signer = link.signer
        self.prefix = link.prefix
        self.worker_id = ""  # the bridge's, given to `run`
        self.bridge: EraBridge | None = None
        self.forwarded = 0  # retries sent to peers (tests, logs)
        self._client: Redis | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._waiting: dict[str, _Waiter] = {}
        self._subscription = Subscription(
            "MRTR", on_message=self._receive, backoff_s=lambda: (link.backoff_min_s, link.backoff_max_s)
        )

    def _inbox(self, worker: str) -> str:
        return f"{self.prefix}:mrtr:{worker}"

    def health(self) -> str:
        return self._subscription.health()

    async def run(self, bridge: EraBridge) -> None:
        self.bridge, self.worker_id = bridge, bridge.worker_id
        name = f"{self.prefix}:mrtr:{self.worker_id}"
        self._client = connect(self.link.url, name=f"{name}:cmd", retries=2, timeout_s=self.link.timeout_s)
        receiver = connect(self.link.url, name=f"{name}:sub", retries=0, timeout_s=self.link.timeout_s)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._subscription.run, receiver, self._inbox(self.worker_id))
        finally:
            self._tg = None
            with anyio.move_on_after(2, shield=True):
                await self._client.aclose()
                await receiver.aclose()

    async def forward(self, owner: str, body: dict[str, Any], timeout: float) -> Result:
        """Run the round of a call parked on `owner` there; its answer, or its error, raised here."""
        if self._client is None:
            raise _gone("Redis is not connected")
        rid = uuid.uuid4().hex
        waiter = _Waiter()
        self._waiting[rid] = waiter
        message = {
            "v": WIRE_VERSION,
            "op": "resume",
            "rid": rid,
            "reply_to": self.worker_id,
            "timeout": timeout,
        }
        try:
            try:
                receivers = await self._client.publish(
                    self._inbox(owner), self.signer.sign(json.dumps({**message, "body": body}))
                )
            except Exception as exc:
                raise _gone(f"Redis is unreachable ({type(exc).__name__})") from None
            if receivers == 0:
                raise _gone("the replica holding the call is gone")
            self.forwarded += 1
            try:
                with anyio.fail_after(timeout + REPLY_MARGIN_S):
                    await waiter.done.wait()
            except TimeoutError:
                raise UpstreamTimeout(f"the upstream did not answer within {timeout:g} s") from None
        finally:
            self._waiting.pop(rid, None)
        if waiter.error is not None:
            raise waiter.error
        return waiter.result or {}

    async def _receive(self, data: bytes | str) -> None:
        try:
            message = json.loads(self.signer.verify(data))
            if not isinstance(message, dict) or message.get("v") != WIRE_VERSION:
                raise ValueError("not a ScaiLink MRTR message of this version")
            if message.get("op") == "reply":
                waiter = self._waiting.get(str(message.get("rid")))
                if waiter is not None:
                    result = message.get("result")
                    waiter.result = result if isinstance(result, dict) else None
                    waiter.error = _error_of(message)
                    waiter.done.set()
            elif message.get("op") == "resume" and self._tg is not None:
                self._tg.start_soon(self._serve, message)
        except (ValueError, TypeError, KeyError) as exc:
            logger.warning("ignored a malformed MRTR message from Redis", extra={"error": str(exc)[:200]})

    async def _serve(self, message: dict[str, Any]) -> None:
        assert self.bridge is not None
        reply: dict[str, Any] = {"v": WIRE_VERSION, "op": "reply", "rid": str(message["rid"])}
        try:
            timeout = float(message.get("timeout") or 60.0)
            reply["result"] = await self.bridge.resume_here(message.get("body") or {}, timeout)
        except ScaiLinkError as err:
            reply["error"] = _error_body(err)
        except Exception as exc:
            logger.exception("a forwarded MRTR round failed")
            reply["error"] = {"code": ScaiLinkError.code, "message": type(exc).__name__}
        try:
            assert self._client is not None
            await self._client.publish(
                self._inbox(str(message["reply_to"])), self.signer.sign(json.dumps(reply))
            )
        except Exception as exc:
            logger.warning("a forwarded MRTR answer was lost", extra={"error": type(exc).__name__})


def _gone(why: str) -> ProtocolError:
    return ProtocolError(f"Invalid or expired requestState ({why})", data={"reason": "invalid_request_state"})
