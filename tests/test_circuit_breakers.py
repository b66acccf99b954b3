"""`remote/breaker.py` on its own: which failures count, and the breakers stepped with an injected clock
(no upstream, no sleeping). The pool's behaviour with real upstreams is `test_breaker.py`'s."""

from __future__ import annotations

import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError

from scailink_mcp.errors import ResultTooLarge, UpstreamError
from scailink_mcp.remote.breaker import (
    SDK_CONNECTION_CLOSED,
    BreakerPolicy,
    CircuitBreakers,
    counts_for_breaker,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breakers(clock: Clock, **kw: float) -> CircuitBreakers:
    values: dict[str, float] = {"failures": 3, "window_s": 60.0, "open_s": 30.0, "min_users": 2, **kw}
    policy = BreakerPolicy(
        failures=int(values["failures"]),
        window_s=values["window_s"],
        open_s=values["open_s"],
        min_users=int(values["min_users"]),
    )
    return CircuitBreakers(policy, clock=clock)


@pytest.mark.parametrize(
    ("exc", "counts"),
    [
        (TimeoutError(), True),
        (OSError("connection refused"), True),
        (MCPError(SDK_CONNECTION_CLOSED, "SSE stream ended without a response"), True),
        (MCPError(types.INVALID_PARAMS, "bad arguments"), False),
        (MCPError(types.METHOD_NOT_FOUND, "unknown tool"), False),
        (ResultTooLarge("too large"), False),
        (UpstreamError("cannot connect"), True),
    ],
)
def test_which_failures_count(exc: BaseException, counts: bool) -> None:
    assert counts_for_breaker(exc) is counts


def test_one_user_opens_only_their_own_circuit() -> None:
    clock = Clock()
    b = breakers(clock)
    for _ in range(3):
        b.check("s1", "alice")
        b.failure("s1", "alice")
    with pytest.raises(UpstreamError, match="circuit open") as err:
        b.check("s1", "alice")
    assert err.value.retry_after == pytest.approx(30.0)
    b.check("s1", "bob")  # another user's calls still go through
    assert b.is_open("s1", "alice") and b.is_open("s1") and not b.is_open("s1", "bob")
    clock.now += 30.5
    b.check("s1", "alice")  # open_s passed: the circuit lets calls through again


def test_several_users_open_the_servers_circuit_for_everyone() -> None:
    clock = Clock()
    b = breakers(clock)
    for user in ("a", "b", "a"):  # three failures within the window, from two users
        b.failure("s1", user)
    assert b.is_open("s1", "newcomer"), "a user who never called fails fast too"
    with pytest.raises(UpstreamError, match="circuit open"):
        b.check("s1", "newcomer")
    b.check("s2", "newcomer")  # other servers are not affected


def test_failures_outside_the_window_do_not_add_up() -> None:
    clock = Clock()
    b = breakers(clock, min_users=1)
    for _ in range(2):
        b.failure("s1", "a")
        clock.now += 61
    b.failure("s1", "a")
    assert not b.is_open("s1")


def test_a_success_clears_the_callers_count_and_idle_breakers_are_forgotten() -> None:
    clock = Clock()
    b = breakers(clock)
    b.failure("s1", "a")
    b.failure("s1", "a")
    assert len(b) == 2  # the user's and the server's
    b.success("s1", "a")
    assert len(b) == 0
    b.failure("s1", "a")
    b.prune(clock.now)
    assert len(b) == 2, "a failure inside the window is kept"
    clock.now += 61
    b.prune(clock.now)
    assert len(b) == 0, "nothing left in the window: forgotten (memory stays bounded)"


def test_min_users_is_at_least_one() -> None:
    b = breakers(Clock(), min_users=0, failures=1)
    b.failure("s1", "a")
    assert b.is_open("s1", "b"), "min_users 0 behaves as 1"
