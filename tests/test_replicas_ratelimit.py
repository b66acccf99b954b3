"""The per-user rate limit across replicas (issue 13 item 7, SPEC section 10): REST and `/mcp` requests
on every replica count against one token bucket in the real Redis on 127.0.0.1:6379 (a key prefix of
their own per test); Redis out of reach fails open to each replica's in-process bucket, logged once.

Skipped only when no Redis answers and SCAILINK_TEST_REQUIRE_REDIS is unset (see test_replicas_events).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest

from scailink_mcp.config import Settings
from scailink_mcp.errors import RateLimited
from scailink_mcp.ratelimit import RateLimiter, RedisRateLimiter
from tests.conftest import LiveApp, TokenFactory, auth_headers
from tests.test_mcp_security import open_session, ping
from tests.test_replicas_events import (  # noqa: F401  (fixtures)
    REDIS_HOST,
    REDIS_PORT,
    _closed_port,
    redis_reason,
    redis_settings,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

SESSIONS = "/v1/modules/scailink/sessions"
SLOW = 0.01  # tokens per second: nothing refills during a test, so counts are exact


@pytest.fixture
def prefix(redis_reason: str | None) -> str:  # noqa: F811
    if redis_reason:
        pytest.skip(redis_reason)
    return f"scailink-test-{uuid.uuid4().hex[:12]}"


def shared(prefix: str, **kw: Any) -> RedisRateLimiter:
    return RedisRateLimiter(f"redis://{REDIS_HOST}:{REDIS_PORT}/0", prefix=prefix, **kw)


async def admitted(limiter: RateLimiter, key: str) -> bool:
    try:
        await limiter.admit(key)
        return True
    except RateLimited:
        return False


async def test_two_limiters_on_their_own_connections_share_one_bucket(prefix: str) -> None:
    a, b = shared(prefix, per_s=SLOW, burst=5), shared(prefix, per_s=SLOW, burst=5)
    try:
        assert [await admitted(a, "t1/u1") for _ in range(3)] == [True] * 3
        assert [await admitted(b, "t1/u1") for _ in range(2)] == [True] * 2
        with pytest.raises(RateLimited) as limited:
            await b.admit("t1/u1")  # the 6th, wherever it lands
        # The same retry_after as the in-process bucket: one token at 0.01/s is 100 s away.
        assert limited.value.retry_after == pytest.approx(100, abs=0.5)
        assert not await admitted(a, "t1/u1")
        assert await admitted(a, "t1/u2"), "another user has a bucket of their own"
        assert a.shared == 5 and b.shared == 3 and a.local == b.local == 0
    finally:
        await _close(a, b)


async def test_it_is_a_token_bucket_not_a_window(prefix: str) -> None:
    """After a spent burst one request passes per `1 / per_s` (a window would lock the user out for
    the rest of it), and `retry_after` says when."""
    limiter = shared(prefix, per_s=20, burst=2)
    try:
        assert await admitted(limiter, "k") and await admitted(limiter, "k")
        with pytest.raises(RateLimited) as limited:
            await limiter.admit("k")
        assert limited.value.retry_after is not None and 0 < limited.value.retry_after <= 0.05
        await anyio.sleep(limited.value.retry_after + 0.01)  # the time under test: the asked-for wait
        assert await admitted(limiter, "k")
        assert not await admitted(limiter, "k"), "one token came back, not the whole burst"
    finally:
        await _close(limiter)


async def _close(*limiters: RedisRateLimiter) -> None:
    async with anyio.create_task_group() as tg:
        for limiter in limiters:
            tg.start_soon(limiter.run)
        tg.cancel_scope.cancel()


async def test_rest_and_mcp_requests_on_two_replicas_count_together(
    redis_settings: Callable[..., Settings],  # noqa: F811
    token: TokenFactory,
) -> None:
    settings = redis_settings(rate_limit_per_s=SLOW, rate_limit_burst=5)
    tok, mcp_user = token("u1", "t1", ("tenant_user",)), token("u2", "t1", ("tenant_user",))
    with LiveApp(settings) as a, LiveApp(settings) as b:
        async with (
            httpx.AsyncClient(base_url=a.base_url) as on_a,
            httpx.AsyncClient(base_url=b.base_url) as on_b,
        ):
            # REST: burst 5, three requests on A and two on B pass; the 6th is 429 on either.
            for client in (on_a, on_a, on_a, on_b, on_b):
                assert (await client.get(SESSIONS, headers=auth_headers(tok))).status_code == 200
            limited = await on_b.get(SESSIONS, headers=auth_headers(tok))
            assert limited.status_code == 429, limited.text
            assert limited.json()["error"]["code"] == "SCAILINK_RATE_LIMITED"
            assert int(limited.headers["retry-after"]) >= 1
            # ... and /mcp shares that bucket: the same user is limited there too, on A.
            refused = await on_a.post(
                "/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"}, headers=auth_headers(tok)
            )
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["code"] == -32600

            # /mcp on A (a session: two requests, a ping: one) and REST on B count together.
            sid = await open_session(on_a, mcp_user)
            assert (await ping(on_a, mcp_user, sid)).status_code == 200
            assert (await on_b.get(SESSIONS, headers=auth_headers(mcp_user))).status_code == 200
            assert (await ping(on_a, mcp_user, sid)).status_code == 200  # the 5th
            assert (await ping(on_a, mcp_user, sid)).status_code == 429
            assert (await on_b.get(SESSIONS, headers=auth_headers(mcp_user))).status_code == 429
    for live in (a, b):
        assert isinstance(live.parts.limiter, RedisRateLimiter)
        assert live.parts.limiter.local == 0 and live.parts.limiter.outages == 0


async def test_redis_unreachable_requests_pass_under_the_local_limit(
    settings_factory: Callable[..., Settings], token: TokenFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """No Redis needed: a URL whose port nobody listens on. Never a 500; each replica's own bucket
    applies the limit (burst 3 here), on REST and /mcp; the outage is logged once."""
    caplog.set_level(logging.WARNING, logger="scailink_mcp.ratelimit")
    settings = settings_factory(
        redis_url=f"redis://{REDIS_HOST}:{_closed_port()}/0", rate_limit_per_s=SLOW, rate_limit_burst=3
    )
    tok, mcp_user = token("u1", "t1", ("tenant_user",)), token("u2", "t1", ("tenant_user",))
    with LiveApp(settings) as live:
        async with httpx.AsyncClient(base_url=live.base_url) as c:
            statuses = [(await c.get(SESSIONS, headers=auth_headers(tok))).status_code for _ in range(4)]
            assert statuses == [200, 200, 200, 429]
            sid = await open_session(c, mcp_user)
            assert [(await ping(c, mcp_user, sid)).status_code for _ in range(2)] == [200, 429]
    limiter = live.parts.limiter
    assert isinstance(limiter, RedisRateLimiter)
    assert limiter.shared == 0 and limiter.local == 8 and limiter.outages == 1
    outages = [
        r for r in caplog.records if r.name == "scailink_mcp.ratelimit" and r.levelno == logging.WARNING
    ]
    assert len(outages) == 1, [r.getMessage() for r in outages]


class TcpProxy:
    """A real TCP forwarder to Redis that a test cuts and restores: an outage of one client's Redis
    without touching the Redis other tests share."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = _closed_port()
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        if self._listener is not None:  # shutdown wakes the thread blocked in accept()
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        for sock in self._sockets:  # shutdown first: it wakes a pump blocked on the socket
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def proxy(prefix: str) -> Iterator[TcpProxy]:
    server = TcpProxy((REDIS_HOST, REDIS_PORT))
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_an_outage_falls_back_to_the_local_bucket_once_then_recovers(
    prefix: str, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="scailink_mcp.ratelimit")
    now = [0.0]
    limiter = RedisRateLimiter(proxy.url, prefix=prefix, per_s=SLOW, burst=3, clock=lambda: now[0])
    try:
        assert await admitted(limiter, "u1") and limiter.shared == 1

        proxy.stop()  # Redis is gone for this replica: the local bucket (3 fresh tokens) answers
        assert [await admitted(limiter, "u1") for _ in range(4)] == [True, True, True, False]
        assert limiter.local == 4 and limiter.outages == 1
        now[0] += limiter.probe_interval_s  # time to ask Redis again: still gone, not logged again
        assert not await admitted(limiter, "u1") and limiter.outages == 1

        proxy.start()
        now[0] += limiter.probe_interval_s
        # Back to the shared bucket, where u1 has spent one token of three (before the outage).
        assert [await admitted(limiter, "u1") for _ in range(3)] == [True, True, False]
        assert limiter.shared == 4 and limiter.outages == 1
    finally:
        await _close(limiter)
    messages = [r.getMessage() for r in caplog.records if r.name == "scailink_mcp.ratelimit"]
    assert len(messages) == 2, messages
    assert "unavailable" in messages[0] and "restored" in messages[1]


def test_without_redis_the_limiter_is_in_process_and_redis_is_never_imported(tmp_path: Any) -> None:
    """The single process: the in-process bucket and lease, and no `redis` module loaded at all."""
    script = (
        "import sys\n"
        "from scailink_mcp.app import build_components\n"
        "from scailink_mcp.config import Settings\n"
        "from scailink_mcp.leases import Lease\n"
        "from scailink_mcp.ratelimit import RateLimiter\n"
        f"parts = build_components(Settings(_env_file=None, data_dir={str(tmp_path)!r}))\n"
        "assert type(parts.limiter) is RateLimiter, parts.limiter\n"
        "assert type(parts.lease) is Lease and type(parts.health.lease) is Lease, parts.lease\n"
        "assert parts.audit.lease is parts.lease and parts.rediscovery.lease is parts.lease\n"
        "loaded = sorted(m for m in sys.modules if m == 'redis' or m.startswith('redis.'))\n"
        "assert not loaded, loaded\n"
    )
    env = {"PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True, text=True)
