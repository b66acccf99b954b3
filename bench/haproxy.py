"""A real HAProxy in front of `scailink serve` replicas (`bench/cluster.py`): round robin, no
stickiness, `/healthz` checks, a stats page that says which replica answered how many requests.

`haproxy_reason()` says why it cannot run here (not installed), or None. The process is started in a
session of its own and always stopped by `load_balancer()`.
"""

from __future__ import annotations

import csv
import io
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from bench.cluster import HOST, KILL_TIMEOUT_S, READY_TIMEOUT_S, Replica, wait_for
from bench.procs import free_port


def haproxy_path() -> str | None:
    """The haproxy binary (Debian installs it in /usr/sbin, not on every user's PATH)."""
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


def haproxy_reason() -> str | None:
    if haproxy_path() is None:
        return "haproxy is not installed (Debian: apt-get install haproxy)"
    return None


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
