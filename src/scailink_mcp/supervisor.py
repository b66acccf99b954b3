"""`scailink serve --workers N`: the checks that several workers can share their state, and the
`Supervisor` that binds the port once and keeps N spawned worker processes serving on it."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess

from scailink_mcp import logs
from scailink_mcp.config import Settings
from scailink_mcp.serving import serve

WORKER_STARTED = b"started"
WORKER_START_TIMEOUT_S = 60.0
WORKER_STOP_MARGIN_S = 10.0

logger = logging.getLogger("scailink_mcp.cli")


def shared_state_problem(settings: Settings) -> str | None:
    """Why several workers cannot serve with `settings`, or None. Workers share no memory: what one
    must know of another's state travels through Redis, and each needs the same database."""
    from sqlalchemy.engine import make_url

    if not settings.redis_url:
        return (
            "needs SCAILINK_REDIS_URL: workers share catalog events, desktop sessions and limits "
            "through Redis, in-process state cannot be shared"
        )
    url = make_url(settings.effective_database_url)
    if url.get_backend_name() == "sqlite" and (
        url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"
    ):
        return (
            "cannot use an in-memory SQLite database (each worker would have its own): "
            "use a SQLite file or PostgreSQL"
        )
    return None


def _listen(settings: Settings) -> socket.socket:
    """The listening socket of all workers, bound once by the supervisor (as uvicorn's own does)."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((settings.host, settings.port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _run_worker(settings: Settings, sock: socket.socket, conn: Connection) -> None:
    """One worker process of `serve --workers N` (module level: the spawned interpreter imports it)."""
    logs.configure(settings.log_level)
    threading.Thread(target=_stop_with_parent, args=(conn,), name="scailink-parent", daemon=True).start()
    serve(settings, sockets=[sock], on_started=lambda: conn.send_bytes(WORKER_STARTED))


def _stop_with_parent(conn: Connection) -> None:
    """Wait until the supervisor's end of the pipe closes (it exited, or was killed), then drain as on
    SIGTERM: no worker outlives its supervisor."""
    try:
        while True:
            conn.recv_bytes()
    except (EOFError, OSError):
        pass
    os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class _Worker:
    process: SpawnProcess
    conn: Connection  # the supervisor's end: one message when the worker serves, EOF when it is gone
    start_deadline: float  # monotonic; serving by then, or the configuration is broken
    started: bool = False


class Supervisor:
    """`scailink serve --workers N`: binds the port once and keeps N worker processes serving on it.

    Workers are spawned (a fresh interpreter each: nothing is inherited but the listening socket and
    the settings), so each builds its own components and makes its own Redis worker identity in its
    lifespan. Each is the single-process server (`serving.serve`), with the same `DrainingServer` drain.
    The supervisor holds no app state and never touches the database (migrations ran before it).

    SIGTERM or SIGINT: close the supervisor's copy of the socket, pass SIGTERM to every worker, wait
    for their drains (bounded), kill what is left. A worker that dies after it started serving is
    replaced; one that dies (or does not start in time) before it served stops them all, exit 1: a
    broken configuration would fail the same way on every restart.
    """

    def __init__(self, settings: Settings, workers: int) -> None:
        self.settings = settings
        self.count = workers
        self.workers: list[_Worker] = []
        self.exit_code = 0
        self._stopping = False
        self._sock: socket.socket | None = None
        self._context = multiprocessing.get_context("spawn")

    def run(self) -> int:
        self._sock = _listen(self.settings)
        wake_r, wake_w = socket.socketpair()  # a signal wakes the wait at once (set_wakeup_fd)
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        previous_wakeup = signal.set_wakeup_fd(wake_w.fileno())
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.workers = [self._spawn() for _ in range(self.count)]
            while not self._stopping:
                self._step(wake_r)
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(previous_wakeup)
            wake_r.close()
            wake_w.close()
        return self.exit_code

    def _on_signal(self, sig: int, frame: object) -> None:
        self._stopping = True

    def _spawn(self) -> _Worker:
        parent_end, child_end = multiprocessing.Pipe()
        process = self._context.Process(
            target=_run_worker, args=(self.settings, self._sock, child_end), name="scailink-worker"
        )
        process.start()
        child_end.close()  # the worker's copy is its own now; ours would hide its EOF
        return _Worker(process, parent_end, time.monotonic() + WORKER_START_TIMEOUT_S)

    def _step(self, wake: socket.socket) -> None:
        """Wait for a worker to start or die (or a signal), and act on it."""
        waiting = [w for w in self.workers if not w.started]
        timeout = max(0.0, min(w.start_deadline for w in waiting) - time.monotonic()) if waiting else None
        ready = multiprocessing.connection.wait(
            [wake, *(w.process.sentinel for w in self.workers), *(w.conn for w in waiting)], timeout
        )
        with contextlib.suppress(BlockingIOError):
            wake.recv(64)
        if self._stopping:
            return
        for index, worker in enumerate(self.workers):
            if not worker.started and worker.conn in ready:
                with contextlib.suppress(EOFError, OSError):
                    worker.started = worker.conn.recv_bytes() == WORKER_STARTED
                if worker.started and all(w.started for w in self.workers):
                    logger.info(
                        "workers serving",
                        extra={
                            "workers": self.count,
                            "url": f"http://{self.settings.host}:{self.settings.port}",
                        },
                    )
            if worker.process.exitcode is None:
                continue
            if not worker.started:
                logger.error("a worker exited before it served", extra={"exit_code": worker.process.exitcode})
                self.exit_code, self._stopping = 1, True
                return
            logger.warning(
                "a worker died: replacing it",
                extra={"pid": worker.process.pid, "exit_code": worker.process.exitcode},
            )
            worker.conn.close()
            self.workers[index] = self._spawn()
        if any(not w.started and time.monotonic() > w.start_deadline for w in self.workers):
            logger.error(
                "a worker did not start serving in time", extra={"timeout_s": WORKER_START_TIMEOUT_S}
            )
            self.exit_code, self._stopping = 1, True

    def _stop_all(self) -> None:
        if self._sock is not None:
            self._sock.close()  # the kernel refuses new connections once the workers closed theirs too
        for worker in self.workers:
            if worker.process.is_alive():
                worker.process.terminate()  # SIGTERM: the worker's DrainingServer drains
        # A drain: in-flight MCP answers (grace), then uvicorn's own wait (grace again), then the lifespan.
        deadline = time.monotonic() + 2 * self.settings.shutdown_grace_s + WORKER_STOP_MARGIN_S
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
        for worker in self.workers:
            if worker.process.is_alive():
                logger.error("a worker did not stop in time: killing it", extra={"pid": worker.process.pid})
                worker.process.kill()
                worker.process.join(WORKER_STOP_MARGIN_S)
            worker.conn.close()
