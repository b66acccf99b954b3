"""What every Redis user of ScaiLink shares: how a connection is made, and how a subscription is kept.

Used by `redis_bus.py` (catalog events), `desktop/cluster.py` (desktop sessions across replicas) and
`mcp_sessions.py` (MCP sessions across replicas).
redis is imported only here and only when a Redis URL is configured: the single process never needs it.

- `connect`: timeouts on connect and on every command, TCP keepalive (a Redis that vanished without
  closing the connection is noticed in ~25 s), a client name that says which worker and which use.
  A subscriber connection gets no silent retries, so that no drop goes unnoticed.
- `Signer`: every message and every session state ScaiLink puts in Redis is signed (HMAC-SHA256
  under a key derived from `SCAILINK_CLUSTER_SECRET`, or from the primary KEK when it is unset), and
  whatever does not verify is ignored: a client of the same Redis that is not a replica of this
  gateway (another deployment, a stray script) cannot inject events, calls or sessions.
- `Subscription`: one subscription kept alive (readiness, state for `/readyz`, the reconnect loop
  with exponential backoff), the same for every user; the owner gives the channels and what to do
  when subscribed and with each message.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from scailink_mcp.config import Settings

logger = logging.getLogger(__name__)


class Signer:
    """`sign(text)` -> `<mac>.<text>`; `verify(data)` -> the text, or ValueError."""

    def __init__(self, secret: bytes) -> None:
        self._key = HKDF(algorithm=SHA256(), length=32, salt=None, info=b"scailink/redis/v1").derive(secret)

    def _mac(self, text: str) -> str:
        digest = hmac.new(self._key, text.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def sign(self, text: str) -> str:
        return f"{self._mac(text)}.{text}"

    def verify(self, data: bytes | str) -> str:
        signed = data.decode() if isinstance(data, bytes) else data
        mac, dot, text = signed.partition(".")
        if not dot or not hmac.compare_digest(mac, self._mac(text)):
            raise ValueError("not signed by a replica of this gateway")
        return text


def cluster_key(settings: Settings) -> bytes | None:
    """The secret all replicas share: `SCAILINK_CLUSTER_SECRET`, else derived from the primary KEK;
    None when neither is set (a single process)."""
    if settings.cluster_secret is not None:
        return base64.b64decode(settings.cluster_secret.get_secret_value().strip())
    if settings.encryption_local_kek is not None:
        kek = base64.b64decode(settings.encryption_local_kek.get_secret_value().strip())
        return hashlib.sha256(b"scailink-cluster-secret" + kek).digest()
    return None


def cluster_signer(settings: Settings) -> Signer:
    """The signer of this gateway's Redis traffic (`cluster_key`)."""
    key = cluster_key(settings)
    if key is None:
        raise ValueError("several replicas need SCAILINK_CLUSTER_SECRET (or SCAILINK_ENCRYPTION_LOCAL_KEK)")
    return Signer(key)


@dataclass(frozen=True)
class PeerLink:
    """How one worker reaches the others through Redis: where, the signer of all it puts there, the
    prefix that keeps one gateway apart from another sharing the Redis, and its clients' connect
    timeout and reconnection backoff. One per app, handed to each part that talks to peers."""

    url: str
    signer: Signer
    prefix: str = "scailink"
    timeout_s: float = 2.0
    backoff_min_s: float = 0.1
    backoff_max_s: float = 5.0

    def __post_init__(self) -> None:
        check_url(self.url)


def peer_link(settings: Settings) -> PeerLink | None:
    """Several workers or replicas (`SCAILINK_REDIS_URL` set): their link; one alone: None."""
    if not settings.redis_url:
        return None
    return PeerLink(settings.redis_url, cluster_signer(settings), settings.redis_prefix)


def make_worker_id() -> str:
    """`host:pid:random`: call it in the worker process itself (after any fork)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def check_url(url: str) -> None:
    """A malformed URL is a configuration error: fail at start-up, not in a background task."""
    from redis.asyncio.connection import parse_url

    parse_url(url)


def _keepalive_options() -> dict[int, int]:
    """Probe an idle connection after 10 s, every 5 s, 3 times."""
    wanted = {"TCP_KEEPIDLE": 10, "TCP_KEEPINTVL": 5, "TCP_KEEPCNT": 3}
    return {getattr(socket, name): value for name, value in wanted.items() if hasattr(socket, name)}


def connect(url: str, *, name: str, retries: int, timeout_s: float) -> Redis:
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff, NoBackoff

    return Redis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_keepalive=True,
        socket_keepalive_options=_keepalive_options(),
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05) if retries else NoBackoff(), retries),
        client_name=name,
    )


class Subscription:
    """One Redis subscription kept alive for its owner, which reads `ready` and `health()` from it.

    `run(client, *channels)` subscribes on the owner's subscriber connection; once Redis confirmed
    every channel, `on_subscribed()` runs (a resync, a log line) and `ready` turns true with no
    checkpoint in between, so nothing woken by `on_subscribed` sees the subscription not ready. Each
    message goes to `on_message`. On a failure it is not ready, logs the loss, waits with exponential
    backoff and subscribes again, until cancelled; the backoff restarts from its minimum after a drop
    of a subscription that had been ready. `backoff_s` gives (minimum, maximum) and is read at every
    loss, so the owner's current values apply.
    """

    def __init__(
        self,
        what: str,
        *,
        on_message: Callable[[bytes | str], Awaitable[None]],
        on_subscribed: Callable[[], Awaitable[None]] | None = None,
        backoff_s: Callable[[], tuple[float, float]],
    ) -> None:
        self.what = what
        self.on_message = on_message
        self.on_subscribed = on_subscribed
        self.backoff_s = backoff_s
        self.ready = False
        self.state = "not started"
        self.subscriptions = 0  # subscriptions confirmed, the first one included (tests, logs)

    def health(self) -> str:
        """`ok`, or why messages are not being received (for `/readyz`)."""
        return "ok" if self.ready else self.state

    async def run(self, client: Redis, *channels: str) -> None:
        backoff = self.backoff_s()[0]
        try:
            while True:
                try:
                    await self._subscribe_once(client, channels)
                    raise ConnectionError("the subscription ended")
                except Exception as exc:
                    least, most = self.backoff_s()
                    was_ready, self.ready = self.ready, False
                    self.state = f"reconnecting ({type(exc).__name__})"
                    if was_ready:
                        backoff = least
                    backoff = min(max(backoff, least), most)
                    logger.warning(
                        f"Redis {self.what} subscription lost, reconnecting",
                        extra={"error": type(exc).__name__, "retry_in_s": backoff},
                    )
                await anyio.sleep(backoff)  # the backoff between attempts, not a synchronisation
                backoff = min(backoff * 2, self.backoff_s()[1])
        finally:
            self.ready, self.state = False, "stopped"

    async def _subscribe_once(self, client: Redis, channels: tuple[str, ...]) -> None:
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(*channels)
            confirmed = 0
            async for message in pubsub.listen():
                if message["type"] == "subscribe":
                    confirmed += 1
                    if confirmed == len(channels):
                        self.subscriptions += 1
                        if self.on_subscribed is not None:
                            await self.on_subscribed()
                        self.ready = True
                elif message["type"] == "message":
                    await self.on_message(message["data"])
        finally:
            with anyio.move_on_after(2, shield=True):
                await pubsub.aclose()
