"""Real ScaiLink clusters (SPEC section 10): `scailink serve` processes on free 127.0.0.1 ports
sharing one database and the real local Redis. The tests (`tests/cluster.py`) and the benchmark
(`bench/replicas.py`) both run them; HAProxy in front of them is `bench/haproxy.py`.

Owns: `ClusterEnv` (what every process of one cluster shares: database URL, Redis URL and a prefix of
the cluster's own, the JWT verification key its tokens are signed for, the KEK), `Replica` (one
`scailink serve` process, `--workers N` included, started in a process group of its own so that its
workers can never outlive it), the context manager `replicas()` that starts them and always stops
them, `wait_for()` (a bounded poll), and `redis_reason()`: why Redis cannot be used here, or None.

Must not: import the app or reach into a process; everything goes over the wire or through signals.
Every wait has a deadline; every process started here is stopped (SIGTERM, SIGKILL after a bound).
No pytest here: the tests' skips and CI requirements are `tests/cluster.py`'s.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import httpx
import redis

from bench.procs import free_port

HOST = "127.0.0.1"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
SCAILINK = [sys.executable, "-m", "scailink_mcp.cli"]
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
KILL_TIMEOUT_S = 5.0
POLL_S = 0.05
# Short drains keep the suite quick; `test_workers_drain_in_flight_calls` proves they still hold.
SHUTDOWN_GRACE_S = 3

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll `check` (another process's state) until it returns a value other than None/False."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(POLL_S)


def redis_reason() -> str | None:
    try:
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
        return None
    except Exception as exc:
        return f"Redis not reachable at {REDIS_HOST}:{REDIS_PORT} ({type(exc).__name__})"


def redis_client_names(prefix: str) -> list[str]:
    """Names of the Redis connections of one cluster (`<prefix>:events:sub:<host:pid:random>`, ...)."""
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=2, socket_timeout=2)
    try:
        names = [str(c.get("name", "")) for c in client.client_list()]
    finally:
        client.close()
    return [n for n in names if n.startswith(f"{prefix}:")]


def event_subscribers(prefix: str) -> list[str]:
    """Worker ids (`host:pid:random`) subscribed to the cluster's catalog events, one per worker."""
    head = f"{prefix}:events:sub:"
    return sorted(n.removeprefix(head) for n in redis_client_names(prefix) if n.startswith(head))


# --- the processes ---------------------------------------------------------------------------------


class ClusterEnv:
    """The environment every `scailink serve` of one cluster gets (nothing inherited from the caller's
    own `SCAILINK_*` variables): one database, one Redis with a prefix of this cluster's own, the
    verification key of the caller's tokens, one KEK (the registry's credentials decrypt everywhere)."""

    def __init__(
        self,
        workdir: Path,
        *,
        database_url: str,
        jwt_public_key: str,
        kek: str,
        redis_url: str | None = REDIS_URL,
        **settings: str,
    ) -> None:
        self.workdir = workdir
        self.database_url = database_url
        self.redis_url = redis_url
        self.redis_prefix = f"scailink-cluster-{uuid.uuid4().hex[:12]}"
        values = {
            "DATA_DIR": str(workdir),
            "DATABASE_URL": database_url,
            "REDIS_PREFIX": self.redis_prefix,
            "JWT_PUBLIC_KEY": jwt_public_key,
            "ENCRYPTION_LOCAL_KEK": kek,
            "ALLOWED_PRIVATE_NETWORKS": "127.0.0.0/8,::1/128",
            "SHUTDOWN_GRACE_S": str(SHUTDOWN_GRACE_S),
            # No health check or re-discovery during a test: only the test's own calls reach the
            # upstream, and no status flip of its own making surprises it.
            "HEALTH_INTERVAL_S": "3600",
            "DISCOVERY_INTERVAL_S": "3600",
        }
        if redis_url:
            values["REDIS_URL"] = redis_url
        values |= {key.upper(): value for key, value in settings.items()}
        self.settings = values

    def environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCAILINK_")}
        env |= {f"SCAILINK_{key}": value for key, value in self.settings.items()}
        return env


class Replica:
    """One `scailink serve` process on its own port; `workers` > 1 runs its supervisor.

    Started in a session (process group) of its own: `stop()` signals the process it started (the
    supervisor passes SIGTERM on to its workers) and, after the bound, SIGKILLs the whole group, so
    no worker is ever left behind.
    """

    def __init__(self, env: ClusterEnv, name: str, *, workers: int = 1, args: Sequence[str] = ()) -> None:
        self.env = env
        self.name = name
        self.workers = workers
        self.port = free_port()
        self.args = list(args)
        self.log_path = env.workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._terminated = False

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was not started"
        return self.proc.pid

    def start(self) -> None:
        command = [*SCAILINK, "serve", "--host", HOST, "--port", str(self.port), *self.args]
        if self.workers > 1:
            command += ["--workers", str(self.workers)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                command,
                env=self.env.environ(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.proc.returncode} before it was ready:\n{self.log_tail()}"
            )
        try:
            return httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """`/readyz` answers 200; with workers, every one of them is subscribed to the events."""
        try:
            wait_for(self._ready, timeout, f"{self.name} /readyz")
            if self.workers > 1:
                wait_for(lambda: len(self.worker_pids()) == self.workers, timeout, f"{self.name} workers")
                wait_for(
                    lambda: set(self.worker_pids()) <= self.subscribed_pids(),
                    timeout,
                    f"{self.name} subscribed",
                )
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.log_tail()}") from exc

    def subscribed_pids(self) -> set[int]:
        """Pids in the worker ids subscribed to this cluster's events (some may be other replicas')."""
        return {int(worker_id.split(":")[1]) for worker_id in event_subscribers(self.env.redis_prefix)}

    def worker_pids(self) -> list[int]:
        """The processes serving: the workers of a supervisor, or the process itself."""
        if self.workers == 1:
            return [self.pid]
        return sorted(pid for pid in children(self.pid) if b"spawn_main" in _cmdline(pid))

    def terminate(self) -> None:
        """SIGTERM once (a second one would change nothing but the log)."""
        if self.proc is not None and not self._terminated and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self._terminated = True

    def kill(self) -> None:
        """SIGKILL of the whole group, as a crash would: no drain, nothing flushed."""
        if self.proc is None:
            return
        if self.proc.poll() is None:  # not reaped yet: the group id is still ours
            _signal_group(self.proc.pid, signal.SIGKILL)
        self.proc.wait(KILL_TIMEOUT_S)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (the drain), SIGKILL of the group after `timeout`; the exit status."""
        if self.proc is None:
            return None
        members = children(self.proc.pid) if self.proc.poll() is None else []
        self.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        for pid in members:  # a worker its supervisor left behind (the group may be gone: by pid)
            if alive(pid) and _pgid(pid) == self.proc.pid:
                os.kill(pid, signal.SIGKILL)
        return self.proc.returncode


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone already
        os.killpg(pgid, sig)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def children(pid: int) -> list[int]:
    """Live child processes of `pid` (Linux `/proc`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextmanager
def replicas(
    env: ClusterEnv, count: int, *, workers: int = 1, args: Sequence[str] = ()
) -> Iterator[list[Replica]]:
    """`count` replicas started together, each ready (or the start fails), all stopped afterwards."""
    started = [Replica(env, f"replica{i}", workers=workers, args=args) for i in range(count)]
    try:
        for replica in started:
            replica.start()
        for replica in started:
            replica.wait_ready()
        yield started
    finally:
        for replica in started:
            replica.terminate()  # all drain at once, then each is waited for
        for replica in started:
            replica.stop()
