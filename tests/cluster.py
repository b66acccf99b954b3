"""Real ScaiLink clusters for tests (SPEC section 10): `scailink serve` processes on free 127.0.0.1
ports sharing one database and the real local Redis, and a real HAProxy in front of them.

The processes are `bench/cluster.py`'s (`ClusterEnv`, `Replica`, `replicas()`, `wait_for`, ...) and
`bench/haproxy.py`'s (`HAProxy`, `load_balancer()`): one harness for the tests and the benchmark,
re-exported here under the names the tests import. What only tests need stays here:

Skips: `require_redis()` and `require_haproxy()` skip a test that cannot run here (`redis_reason()`,
`haproxy_reason()` say why), or fail it when `SCAILINK_TEST_REQUIRE_REDIS` /
`SCAILINK_TEST_REQUIRE_HAPROXY` is set (CI).

`serving_pid()`: which worker process answered a request (Linux `/proc`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.cluster import (
    READY_TIMEOUT_S,
    REDIS_URL,
    SCAILINK,
    ClusterEnv,
    Replica,
    alive,
    event_subscribers,
    redis_reason,
    replicas,
)
from bench.haproxy import HAProxy, haproxy_reason, load_balancer
from bench.procs import free_port

__all__ = [  # what the tests import from here
    "READY_TIMEOUT_S",
    "REDIS_URL",
    "SCAILINK",
    "ClusterEnv",
    "HAProxy",
    "Replica",
    "alive",
    "event_subscribers",
    "free_port",
    "load_balancer",
    "replicas",
    "require_haproxy",
    "require_redis",
    "serving_pid",
]


def require(reason: str | None, variable: str) -> None:
    """Skip for `reason` (something missing on this machine), or fail when `variable` says the
    machine must have it (CI)."""
    if reason and os.environ.get(variable):
        pytest.fail(f"{reason}, but {variable} is set (CI)")
    if reason:
        pytest.skip(reason)


def require_redis() -> None:
    require(redis_reason(), "SCAILINK_TEST_REQUIRE_REDIS")


def require_haproxy() -> None:
    require(haproxy_reason(), "SCAILINK_TEST_REQUIRE_HAPROXY")


def serving_pid(response: httpx.Response, pids: Iterable[int]) -> int | None:
    """Which of `pids` holds the server end of the connection that carried `response` (still open:
    read it before the client closes). With several workers on one port the kernel hands each new
    connection to one of them; this is how a test sees which."""
    stream: Any = response.extensions["network_stream"]
    client_port = stream.get_extra_info("client_addr")[1]
    server_port = stream.get_extra_info("server_addr")[1]
    inode = _tcp_inode(local_port=server_port, remote_port=client_port)
    if inode is None:
        return None
    link = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == link:
                    return pid
            except OSError:
                continue
    return None


def _tcp_inode(*, local_port: int, remote_port: int) -> str | None:
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if int(local.split(":")[1], 16) == local_port and int(remote.split(":")[1], 16) == remote_port:
            return inode
    return None
