"""Desktop sessions across replicas (SPEC section 10): the shared directory and the routing of calls.

Only with `SCAILINK_REDIS_URL`. Each worker announces the desktop sessions whose WebSocket it holds,
lists its peers' sessions from a mirror kept in memory (the catalog never queries Redis), and
forwards a call for a peer's device to the worker that holds it.

Redis layout (`<p>` is `SCAILINK_REDIS_PREFIX`):
- `<p>:desktop:s:<session_id>`: hash {epoch, owner, record}: the session as its owner announced it
  (TTL 60 s, refreshed by the owner every 20 s). Read once at start-up and after every reconnect.
- `<p>:desktop:epoch`: the fencing counter. Every announcement takes the next value; the newest
  announcement of a session or a device wins everywhere, and an older one is ignored (so a late
  "withdraw" from a replica that lost a session to a resume elsewhere never removes it).
- `<p>:worker:<id>`: a worker's heartbeat (PX 3 s, refreshed every second). A peer whose heartbeat
  expired is gone: its sessions leave every mirror, and calls waiting on it fail at once.
- channel `<p>:desktop`: announcements (`upsert`, `withdraw`) to every worker.
- channel `<p>:inbox:<id>`: one per worker, subscribed once at start-up on the same connection:
  requests (`invoke`, `consent`, `terminate`, `cancel`) and the replies to this worker's requests.

A forwarded request that no worker receives (PUBLISH counts 0 subscribers: the owner's process is
gone) fails `SCAILINK_DEVICE_OFFLINE` at once; one whose owner dies while it waits fails within the
heartbeat sweep (about 1-3 s); the owner applies the call's own timeout and answers
`SCAILINK_UPSTREAM_TIMEOUT` itself. A caller that stops waiting (cancellation) tells the owner, which
cancels the call on the device. Calls for this worker's own sessions never leave the process.

Redis unreachable: peers' sessions answer `SCAILINK_DEVICE_OFFLINE`; local sessions keep working;
when the subscription is back, this worker reloads the directory and re-announces its own sessions.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from scailink_mcp.desktop.sessions import DesktopSession, Pending
from scailink_mcp.errors import DeviceOffline, ScaiLinkError, UpstreamTimeout, error_class
from scailink_mcp.redis_link import PeerLink, Subscription, connect, make_worker_id

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from scailink_mcp.desktop.connections import DesktopRegistry

logger = logging.getLogger(__name__)

WIRE_VERSION = 1
SESSION_TTL_MS = 60_000
SESSION_REFRESH_S = 20.0
HEARTBEAT_TTL_MS = 3_000
HEARTBEAT_S = 1.0
# A forwarded call waits this much longer than its own timeout (the owner answers the timeout itself).
REPLY_MARGIN_S = 2.0

# Compare-and-delete: a session key is removed only by the announcement that wrote it.
_WITHDRAW = """
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class DesktopCluster:
    """One per worker; `run()` is owned by the app lifespan. `registry` is bound by `DesktopRegistry`."""

    def __init__(self, link: PeerLink) -> None:
        self.link = link
        self.worker_id = ""  # made by run(), in the worker process
        self.registry: DesktopRegistry | None = None
        self._client: Redis | None = None
        self._tg: TaskGroup | None = None
        self._subscription = Subscription(
            "desktop",
            on_message=self._receive,
            on_subscribed=self._resubscribed,
            backoff_s=lambda: (self.link.backoff_min_s, self.link.backoff_max_s),
        )
        self._outbox: dict[str, str] = {}  # session id -> "upsert" | "withdraw", latest wins
        self._epochs: dict[str, int] = {}  # session id -> the epoch this worker last wrote
        self._wake = anyio.Event()
        self._waiting: dict[str, tuple[str, Pending]] = {}  # request id -> (owner, waiter)
        self._serving: dict[str, anyio.CancelScope] = {}
        self._missing: set[str] = set()  # peers whose heartbeat the last sweep did not find
        self.forwarded = 0  # requests sent to peers (tests, logs)

    # ---- names -------------------------------------------------------------------------------------

    def _key(self, session_id: str) -> str:
        return f"{self.link.prefix}:desktop:s:{session_id}"

    def _inbox(self, worker: str) -> str:
        return f"{self.link.prefix}:inbox:{worker}"

    def _heartbeat(self, worker: str) -> str:
        return f"{self.link.prefix}:worker:{worker}"

    @property
    def _channel(self) -> str:
        return f"{self.link.prefix}:desktop"

    # ---- health ------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._subscription.ready

    def health(self) -> str:
        return self._subscription.health()

    # ---- what the registry calls -------------------------------------------------------------------

    def announce(self, session: DesktopSession) -> None:
        """This worker's session changed (opened, resumed, catalog, state): tell the peers, soon."""
        self._outbox[session.session_id] = "upsert"
        self._wake.set()

    def withdraw(self, session: DesktopSession) -> None:
        """This worker's session ended."""
        self._outbox[session.session_id] = "withdraw"
        self._wake.set()

    def forget(self, session: DesktopSession) -> None:
        """This worker's session moved to another replica (a resume there): its key is theirs now."""
        self._outbox.pop(session.session_id, None)
        self._epochs.pop(session.session_id, None)

    async def forward(self, session: DesktopSession, op: str, body: dict[str, Any], timeout: float) -> Any:
        """Send `op` for a peer's session to its owner and wait for the answer (see the module doc)."""
        if self._client is None or not self.ready:
            raise DeviceOffline("the desktop device is on another replica, and Redis is unreachable")
        rid = uuid.uuid4().hex
        waiter = Pending()
        self._waiting[rid] = (session.owner, waiter)
        message = {"v": WIRE_VERSION, "op": op, "rid": rid, "reply_to": self.worker_id, "timeout": timeout}
        try:
            try:
                receivers = await self._client.publish(
                    self._inbox(session.owner),
                    self.link.signer.sign(json.dumps({**message, "session_id": session.session_id, **body})),
                )
            except Exception as exc:
                raise DeviceOffline(f"Redis is unreachable ({type(exc).__name__})") from None
            if receivers == 0:
                raise DeviceOffline("the replica holding the desktop device is gone")
            self.forwarded += 1
            try:
                with anyio.fail_after(timeout + REPLY_MARGIN_S):
                    await waiter.done.wait()
            except TimeoutError:
                raise UpstreamTimeout(f"the desktop device did not answer within {timeout:g} s") from None
            except anyio.get_cancelled_exc_class():
                with anyio.move_on_after(1, shield=True):  # the owner stops the call on the device
                    await self._send(
                        self._inbox(session.owner), {"v": WIRE_VERSION, "op": "cancel", "rid": rid}
                    )
                raise
        finally:
            self._waiting.pop(rid, None)
        if waiter.error is not None:
            raise waiter.error
        return (waiter.result or {}).get("value")

    # ---- the background tasks ----------------------------------------------------------------------

    async def run(self) -> None:
        self.worker_id = make_worker_id()
        self._subscription.state = "connecting"
        name = f"{self.link.prefix}:desktop:{self.worker_id}"
        self._client = connect(self.link.url, name=f"{name}:cmd", retries=2, timeout_s=self.link.timeout_s)
        receiver = connect(self.link.url, name=f"{name}:sub", retries=0, timeout_s=self.link.timeout_s)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._beat_forever)
                tg.start_soon(self._announce_forever)
                tg.start_soon(self._subscription.run, receiver, self._channel, self._inbox(self.worker_id))
        finally:
            with anyio.move_on_after(2, shield=True):
                try:  # a clean stop: peers forget this worker's sessions at once
                    for session_id in list(self._epochs):
                        await self._withdraw(session_id)
                    await self._client.delete(self._heartbeat(self.worker_id))
                except Exception as exc:  # Redis unreachable: the keys expire by themselves
                    logger.warning(
                        "desktop sessions not withdrawn at shutdown", extra={"error": type(exc).__name__}
                    )
            with anyio.move_on_after(2, shield=True):
                await self._client.aclose()
                await receiver.aclose()
            self._client = None

    async def _beat_forever(self) -> None:
        """The heartbeat, the refresh of this worker's session keys, and the sweep of dead peers."""
        assert self._client is not None
        refreshed = 0.0
        while True:
            try:
                previous = await self._client.set(
                    self._heartbeat(self.worker_id), "1", px=HEARTBEAT_TTL_MS, get=True
                )
                if previous is None and self.ready:  # Redis lost its keys (a restart): announce all again
                    for session_id in self.registry.sessions if self.registry else ():
                        self._outbox[session_id] = "upsert"
                    self._wake.set()
                now = anyio.current_time()
                if now - refreshed >= SESSION_REFRESH_S:
                    refreshed = now
                    for session_id in list(self._epochs):
                        await self._client.pexpire(self._key(session_id), SESSION_TTL_MS)
                await self._sweep()
            except Exception as exc:
                logger.warning("desktop heartbeat failed", extra={"error": type(exc).__name__})
            await anyio.sleep(HEARTBEAT_S)

    async def _sweep(self) -> None:
        """Peers whose heartbeat expired: their sessions leave the mirror, their waiters fail."""
        assert self._client is not None and self.registry is not None
        owners = {s.owner for s in self.registry.peers.values()} | {o for o, _ in self._waiting.values()}
        owners.discard(self.worker_id)
        missing: set[str] = set()
        for owner in owners:
            if await self._client.exists(self._heartbeat(owner)):
                continue
            missing.add(owner)
            if owner not in self._missing:  # gone only when missing twice (not just after a Redis restart)
                continue
            logger.warning("a replica holding desktop sessions is gone", extra={"worker": owner})
            for o, waiter in list(self._waiting.values()):
                if o == owner:
                    waiter.settle(error=DeviceOffline("the replica holding the desktop device is gone"))
            await self.registry.drop_owner(owner)
        self._missing = missing

    async def _announce_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            if not self.ready:
                continue  # re-announced as a whole once the subscription is back
            batch, self._outbox = self._outbox, {}
            for session_id, op in batch.items():
                try:
                    if op == "upsert":
                        await self._upsert(session_id)
                    else:
                        await self._withdraw(session_id)
                except Exception as exc:
                    logger.error(
                        "desktop session not announced to the other replicas",
                        extra={"session_id": session_id, "error": type(exc).__name__},
                    )

    async def _upsert(self, session_id: str) -> None:
        assert self._client is not None and self.registry is not None
        session = self.registry.sessions.get(session_id)
        if session is None:
            return
        epoch = int(await self._client.incr(f"{self.link.prefix}:desktop:epoch"))
        session.epoch = epoch
        self._epochs[session_id] = epoch
        record = session.record()
        key = self._key(session_id)
        signed = self.link.signer.sign(json.dumps(record))
        await self._client.hset(key, mapping={"epoch": epoch, "owner": self.worker_id, "record": signed})
        await self._client.pexpire(key, SESSION_TTL_MS)
        await self._send(
            self._channel, {"op": "upsert", "owner": self.worker_id, "epoch": epoch, "record": record}
        )

    async def _withdraw(self, session_id: str) -> None:
        assert self._client is not None
        epoch = self._epochs.pop(session_id, None)
        if epoch is None:
            return
        await self._client.eval(_WITHDRAW, 1, self._key(session_id), str(epoch))
        await self._send(
            self._channel,
            {"op": "withdraw", "owner": self.worker_id, "epoch": epoch, "session_id": session_id},
        )

    async def _send(self, channel: str, message: dict[str, Any]) -> int:
        assert self._client is not None
        text = json.dumps({"v": WIRE_VERSION, **message})
        return int(await self._client.publish(channel, self.link.signer.sign(text)))

    async def _resubscribed(self) -> None:
        """Both channels confirmed: reload the directory, then wake the announcer (it runs once the
        subscription is ready, which it turns at once after this returns)."""
        await self._resync()
        self._wake.set()

    async def _resync(self) -> None:
        """After (re)subscribing: load the peers' sessions, then re-announce all of this worker's."""
        assert self._client is not None and self.registry is not None
        found: list[tuple[dict[str, Any], str, int]] = []
        async for key in self._client.scan_iter(match=self._key("*"), count=500):
            entry = {_text(k): _text(v) for k, v in (await self._client.hgetall(key)).items()}
            owner = entry.get("owner", "")
            if owner and owner != self.worker_id:  # a dead owner's sessions leave at the next sweeps
                try:
                    found.append(
                        (json.loads(self.link.signer.verify(entry["record"])), owner, int(entry["epoch"]))
                    )
                except (ValueError, KeyError):
                    logger.warning("ignored a desktop session key not signed by this gateway")
        await self.registry.load_peers(found)
        for session_id in self.registry.sessions:
            self._outbox[session_id] = "upsert"

    # ---- what arrives ------------------------------------------------------------------------------

    async def _receive(self, data: bytes | str) -> None:
        assert self.registry is not None and self._tg is not None
        try:
            message = json.loads(self.link.signer.verify(data))
            if not isinstance(message, dict) or message.get("v") != WIRE_VERSION:
                raise ValueError("not a ScaiLink desktop message of this version")
            op = message.get("op")
            if op == "upsert" and message["owner"] != self.worker_id:
                await self.registry.apply_peer(message["record"], message["owner"], int(message["epoch"]))
            elif op == "withdraw" and message["owner"] != self.worker_id:
                await self.registry.drop_peer(message["session_id"], int(message["epoch"]))
            elif op == "reply":
                self._settle(message)
            elif op == "cancel":
                scope = self._serving.get(str(message.get("rid")))
                if scope is not None:
                    scope.cancel()
            elif op in ("invoke", "consent", "terminate"):
                self._tg.start_soon(self._serve, message)
        except (ValueError, TypeError, KeyError) as exc:
            logger.warning("ignored a malformed desktop message from Redis", extra={"error": str(exc)[:200]})

    def _settle(self, message: dict[str, Any]) -> None:
        entry = self._waiting.get(str(message.get("rid")))
        if entry is None:
            return  # the caller stopped waiting
        error = message.get("error")
        if isinstance(error, dict):
            cls = error_class(str(error.get("code")))
            entry[1].settle(error=cls(str(error.get("message", ""))[:500] or None))
        else:
            entry[1].settle(result={"value": message.get("result")})

    async def _serve(self, message: dict[str, Any]) -> None:
        """A peer's request for one of this worker's sessions; the answer goes to its inbox."""
        assert self.registry is not None
        rid, reply_to = str(message["rid"]), str(message["reply_to"])
        reply: dict[str, Any] = {"op": "reply", "rid": rid}
        with anyio.CancelScope() as scope:
            self._serving[rid] = scope
            try:
                session = self.registry.sessions.get(str(message.get("session_id")))
                if session is None:
                    raise DeviceOffline("the desktop session is no longer on this replica")
                reply["result"] = await self.registry.serve_peer(session, message)
            except ScaiLinkError as err:
                reply["error"] = {"code": err.code, "message": err.message}
            except Exception as exc:
                logger.exception("a forwarded desktop request failed")
                reply["error"] = {"code": ScaiLinkError.code, "message": type(exc).__name__}
            finally:
                self._serving.pop(rid, None)
        if scope.cancelled_caught:
            return
        try:
            await self._send(self._inbox(reply_to), reply)
        except Exception as exc:
            logger.warning("a forwarded desktop answer was lost", extra={"error": type(exc).__name__})
