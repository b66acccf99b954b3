"""`RedisEventBus`: the `EventBus` of several workers and replicas (SPEC section 10), over Redis pub/sub.

Same two methods as `EventBus`. `publish` dispatches to this worker's subscribers at once (exactly as
`EventBus` does) and queues the event for Redis; one sender task PUBLISHes it on the channel
`<prefix>:events` as JSON (`{"v": 1, "origin": <worker id>, "type": "server_event", "event": {fields}}`).
One subscriber task per worker SUBSCRIBEs to that channel once and dispatches every event published
by another worker to the local subscribers, in the order it was published; its own are ignored. So a
registration, update, deletion, refresh, credential rotation, status flip or rediscovery made through
any replica refreshes every replica's directory, closes its pooled sessions when needed and sends
`list_changed` to the downstream sessions it holds. Subscribers re-read the database (the source of
truth): an event only says which server moved.

`ServerEvent`, `RolesChanged` and `UpstreamAuthorized` cross workers here. `DesktopCatalogChanged` stays
local: desktop sessions travel through `desktop/cluster.py`, whose announcements make each peer publish
its own `DesktopCatalogChanged` locally.

Worker identity (`host:pid:random`) is made when `run()` starts, in the lifespan of the worker process
itself, never at import or construction time: a process forked afterwards (a preloading server) would
otherwise share its parent's id and ignore its siblings' events as its own.

Failure handling:
- A PUBLISH that fails (Redis down, queue full) is logged and counted; the caller's request never
  fails or waits for Redis (the local dispatch already happened, the sender works in the background).
- The subscriber is supervised: when its connection drops it reconnects with exponential backoff, and
  `ready` is False (so `/readyz` answers 503) from the drop until the new SUBSCRIBE is confirmed.
  redis-py's own silent retry is off for that connection so that no drop goes unnoticed
  (`redis_link.py` makes the connections and keeps the subscription).
- Events published by peers while this worker was not subscribed are not replayed (Redis pub/sub
  keeps nothing); re-syncing the caches after an outage belongs to the Redis-faults work (item 8).

An event that crosses workers is dispatched here with `from_peer()` True: a subscriber with a durable
side effect (the audit of a registry change) checks it, since the worker that made the change already
recorded it.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import logging
from typing import TYPE_CHECKING, Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from scailink_mcp.events import (
    Event,
    EventBus,
    RolesChanged,
    ServerEvent,
    ServerEventKind,
    UpstreamAuthorized,
)
from scailink_mcp.redis_link import PeerLink, Subscription, connect, make_worker_id

if TYPE_CHECKING:  # redis is imported only when a Redis URL is configured (the single process never needs it)
    from redis.asyncio import Redis

logger = logging.getLogger(__name__)

WIRE_VERSION = 1
SERVER_EVENT = "server_event"
ROLES_CHANGED = "roles_changed"
UPSTREAM_AUTHORIZED = "upstream_authorized"
_SERVER_EVENT_FIELDS = tuple(f.name for f in dataclasses.fields(ServerEvent))
_AUTHORIZED_FIELDS = tuple(f.name for f in dataclasses.fields(UpstreamAuthorized))

_from_peer: contextvars.ContextVar[bool] = contextvars.ContextVar("scailink_event_from_peer", default=False)


def from_peer() -> bool:
    """True while a subscriber handles an event another worker published (and already handled)."""
    return _from_peer.get()


Shared = ServerEvent | RolesChanged | UpstreamAuthorized  # the events that cross workers here


def encode(event: Shared, origin: str) -> str:
    if isinstance(event, RolesChanged):
        fields: dict[str, Any] = {"tenant_id": event.tenant_id}
        return json.dumps({"v": WIRE_VERSION, "origin": origin, "type": ROLES_CHANGED, "event": fields})
    if isinstance(event, UpstreamAuthorized):
        fields = dataclasses.asdict(event)
        return json.dumps({"v": WIRE_VERSION, "origin": origin, "type": UPSTREAM_AUTHORIZED, "event": fields})
    fields = {name: getattr(event, name) for name in _SERVER_EVENT_FIELDS}
    fields["kind"] = event.kind.value
    return json.dumps({"v": WIRE_VERSION, "origin": origin, "type": SERVER_EVENT, "event": fields})


def decode(data: bytes | str) -> tuple[str, Shared]:
    """(origin, event) of one message; ValueError when it is not an event of this wire version."""
    message = json.loads(data)
    if not isinstance(message, dict) or message.get("v") != WIRE_VERSION:
        raise ValueError("not a ScaiLink event of this version")
    origin, kind, fields = message.get("origin"), message.get("type"), message.get("event")
    if not isinstance(origin, str) or not isinstance(fields, dict):
        raise ValueError("not a ScaiLink event")
    if kind == ROLES_CHANGED and isinstance(fields.get("tenant_id"), str):
        return origin, RolesChanged(fields["tenant_id"])
    if kind == UPSTREAM_AUTHORIZED:
        if not all(isinstance(fields.get(name), str) for name in _AUTHORIZED_FIELDS):
            raise ValueError("bad upstream_authorized event")
        return origin, UpstreamAuthorized(**{name: fields[name] for name in _AUTHORIZED_FIELDS})
    if kind != SERVER_EVENT:
        raise ValueError("not a server event")
    values: dict[str, Any] = {}
    for name in _SERVER_EVENT_FIELDS:
        value = fields.get(name, "" if name == "actor_user_id" else None)
        expected = bool if name == "is_tenant_shared" else str
        if not isinstance(value, expected):
            raise ValueError(f"bad field {name!r}")
        values[name] = value
    values["kind"] = ServerEventKind(values["kind"])
    return origin, ServerEvent(**values)


def _describe(event: Shared) -> dict[str, str]:
    """What a log line says of an event."""
    if isinstance(event, RolesChanged):
        return {"event": ROLES_CHANGED, "tenant_id": event.tenant_id}
    if isinstance(event, UpstreamAuthorized):
        return {"event": UPSTREAM_AUTHORIZED, "server_id": event.server_id}
    return {"event": event.kind.value, "server_id": event.server_id}


class RedisEventBus(EventBus):
    """Local fan-out (inherited) plus Redis fan-out to the other workers. `run()` is owned by the app
    lifespan: it makes the worker id, then runs the sender and the supervised subscriber until
    cancelled."""

    def __init__(self, link: PeerLink, *, queue_size: int = 10_000) -> None:
        super().__init__()
        self.link = link
        self.channel = f"{link.prefix}:events"
        self.client_name_prefix = f"{link.prefix}:events"
        self.worker_id = ""  # made by run(), in the worker process
        self._outbox: MemoryObjectSendStream[Shared]
        self._pending: MemoryObjectReceiveStream[Shared]
        self._outbox, self._pending = anyio.create_memory_object_stream[Shared](queue_size)
        self._subscription = Subscription(
            "event",
            on_message=self._receive,
            on_subscribed=self._subscribed,
            backoff_s=lambda: (self.link.backoff_min_s, self.link.backoff_max_s),
        )
        # Counters (tests, logs): events sent, not sent, received from peers.
        self.published = 0
        self.publish_failures = 0
        self.received = 0

    # ---- the EventBus interface ------------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        if isinstance(event, ServerEvent | RolesChanged | UpstreamAuthorized):
            try:  # queued before the local dispatch: a cancelled caller cannot keep it from peers
                self._outbox.send_nowait(event)
            except anyio.WouldBlock:
                self.publish_failures += 1
                logger.error(
                    "event not published to Redis: the outgoing queue is full",
                    extra=_describe(event),
                )
        await super().publish(event)

    # ---- health ----------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Subscribed to the channel right now (events from peers are being received)."""
        return self._subscription.ready

    @property
    def subscriptions(self) -> int:
        """Subscriptions confirmed, the first one included (tests, logs)."""
        return self._subscription.subscriptions

    def health(self) -> str:
        """`ok`, or why events from other workers are not being received (for `/readyz`)."""
        return self._subscription.health()

    # ---- the background tasks --------------------------------------------------------------------

    def _client(self, *, name: str, retries: int) -> Redis:
        return connect(self.link.url, name=name, retries=retries, timeout_s=self.link.timeout_s)

    async def run(self) -> None:
        self.worker_id = make_worker_id()
        self._subscription.state = "connecting"
        sender = self._client(name=f"{self.client_name_prefix}:pub:{self.worker_id}", retries=2)
        receiver = self._client(name=f"{self.client_name_prefix}:sub:{self.worker_id}", retries=0)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._send_forever, sender)
                tg.start_soon(self._subscription.run, receiver, self.channel)
        finally:
            with anyio.move_on_after(2, shield=True):
                await sender.aclose()
                await receiver.aclose()

    async def _send_forever(self, client: Redis) -> None:
        async for event in self._pending:
            try:
                with anyio.fail_after(self.link.timeout_s * 3):
                    await client.publish(self.channel, self.link.signer.sign(encode(event, self.worker_id)))
                self.published += 1
            except Exception as exc:
                self.publish_failures += 1
                logger.error(
                    "event not published to Redis: other workers will not see it",
                    extra={**_describe(event), "error": type(exc).__name__},
                )

    async def _subscribed(self) -> None:
        if self._subscription.subscriptions > 1:
            logger.info("Redis event subscription restored")

    async def _receive(self, data: bytes | str) -> None:
        try:
            origin, event = decode(self.link.signer.verify(data))
        except (ValueError, TypeError) as exc:
            logger.warning("ignored a malformed event from Redis", extra={"error": str(exc)[:200]})
            return
        if origin == self.worker_id:
            return
        self.received += 1
        token = _from_peer.set(True)
        try:
            await super().publish(event)  # local subscribers only; never sent back to Redis
        finally:
            _from_peer.reset(token)
