"""Real ScaiLink clusters for tests (SPEC section 10): `scailink serve` processes on free 127.0.0.1
ports sharing one database and the real local Redis, and a real HAProxy in front of them.

Owns: `ClusterEnv` (what every process of one cluster shares: database URL, Redis URL and a prefix of
the test's own, the JWT verification key the tests' `token` fixture signs for, the KEK), `Replica`
(one `scailink serve` process, `--workers N` included, started in a process group of its own so that
its workers can never outlive it), `HAProxy` (round robin, no stickiness, `/healthz` checks, a stats
page the tests read), the context managers `replicas()` and `load_balancer()` that start them and
always stop them, and `serving_pid()`: which worker process answered a request (Linux `/proc`).

Skips: `require_redis()` and `require_haproxy()` skip a test that cannot run here (`redis_reason()`,
`haproxy_reason()` say why), or fail it when `SCAILINK_TEST_REQUIRE_REDIS` /
`SCAILINK_TEST_REQUIRE_HAPROXY` is set (CI).

Must not: import the app or reach into a process; everything goes over the wire or through signals.
Every wait has a deadline; every process started here is stopped (SIGTERM, SIGKILL after a bound).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis

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


def free_port() -> int:
    """A port nobody listens on now (the process given it binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


# --- what may be missing on a machine -------------------------------------------------------------


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


def haproxy_path() -> str | None:
    """The haproxy binary (Debian installs it in /usr/sbin, not on every user's PATH)."""
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


def haproxy_reason() -> str | None:
    if haproxy_path() is None:
        return "haproxy is not installed (Debian: apt-get install haproxy)"
    return None


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
    """The environment every `scailink serve` of one cluster gets (nothing inherited from the test's
    own `SCAILINK_*` variables): one database, one Redis with a prefix of this cluster's own, the
    verification key of the tests' tokens, one KEK (the registry's credentials decrypt everywhere)."""

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


# --- the load balancer -----------------------------------------------------------------------------

HAPROXY_CONFIG = """\
global
    maxconn 2000
    log stderr format raw local0 info

defaults
    mode http
    log global
    option httplog
    option redispatch 1        # each retry of a refused connection goes to another replica
    retries 2
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout http-request 10s
    timeout http-keep-alive 5s
    timeout tunnel 1h          # WebSocket upgrades and SSE streams
    timeout client-fin 1s
    timeout server-fin 1s

frontend scailink
    bind {host}:{port}
    default_backend replicas

backend replicas
    balance roundrobin         # no stickiness: any request may land on any replica
    option httpchk GET /healthz
    http-check expect status 200
    default-server inter 200ms fastinter 100ms downinter 200ms fall 2 rise 2
{servers}

listen stats
    bind {host}:{stats_port}
    stats enable
    stats uri /stats
"""


class HAProxy:
    """A real HAProxy (`haproxy -f cfg -db`) in front of `replicas`, its config in `workdir`."""

    def __init__(self, replicas: Sequence[Replica], workdir: Path) -> None:
        self.replicas = list(replicas)
        self.port = free_port()
        self.stats_port = free_port()
        self.config_path = workdir / "haproxy.cfg"
        self.log_path = workdir / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None
        servers = "\n".join(f"    server {r.name} {HOST}:{r.port} check" for r in self.replicas)
        self.config_path.write_text(
            HAPROXY_CONFIG.format(host=HOST, port=self.port, stats_port=self.stats_port, servers=servers)
        )

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        haproxy = haproxy_path()
        assert haproxy is not None, haproxy_reason()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [haproxy, "-f", str(self.config_path), "-db"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self.wait_status({r.name: "UP" for r in self.replicas}, READY_TIMEOUT_S)
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"{exc}\n{self.log_path.read_text(errors='replace')[-3000:]}") from exc

    def stats(self) -> list[dict[str, str]]:
        """HAProxy's stats as CSV rows (`pxname`, `svname`, `status`, `hrsp_2xx`, ...)."""
        text = httpx.get(f"http://{HOST}:{self.stats_port}/stats;csv", timeout=2).text
        return list(csv.DictReader(io.StringIO(text.removeprefix("# "))))

    def server_status(self) -> dict[str, str]:
        """`UP`, `DOWN`, ... of each replica as HAProxy's health checks see it."""
        return {row["svname"]: row["status"] for row in self.stats() if row["pxname"] == "replicas"}

    def answered(self) -> dict[str, int]:
        """Requests each replica answered (any status) through the load balancer."""
        rows = [row for row in self.stats() if row["pxname"] == "replicas" and row["svname"] != "BACKEND"]
        return {row["svname"]: sum(int(row[f"hrsp_{n}xx"] or 0) for n in range(1, 6)) for row in rows}

    def wait_status(self, wanted: dict[str, str], timeout: float) -> None:
        def reached() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}")
            try:
                status = self.server_status()
            except httpx.HTTPError:
                return False
            return all(status.get(name, "").startswith(state) for name, state in wanted.items())

        wait_for(reached, timeout, f"haproxy servers {wanted}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # a hard stop: the test is over
            try:
                self.proc.wait(KILL_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(KILL_TIMEOUT_S)


@contextmanager
def load_balancer(replicas: Sequence[Replica], workdir: Path) -> Iterator[HAProxy]:
    """HAProxy in front of `replicas`, every one of them UP, stopped afterwards."""
    with ExitStack() as stack:
        lb = HAProxy(replicas, workdir)
        stack.callback(lb.stop)
        lb.start()
        yield lb
