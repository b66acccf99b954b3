"""The `scailink` command: dev, serve (one process, or `--workers N` under a `Supervisor`), migrate,
token, kek generate|rotate, openapi."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from scailink_mcp import logs
from scailink_mcp.config import Settings

DEV_KEY_FILE = "dev_signing_key.pem"
DEV_KEK_FILE = "dev_kek"
DEV_LOOPBACK = ["127.0.0.0/8", "::1/128"]
WORKER_STARTED = b"started"
WORKER_START_TIMEOUT_S = 60.0
WORKER_STOP_MARGIN_S = 10.0

if TYPE_CHECKING:
    import uvicorn

    from scailink_mcp.crypto import Keyring
    from scailink_mcp.db import Database

logger = logging.getLogger("scailink_mcp.cli")


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] = {}
    for name in ("host", "port", "database_url", "data_dir"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return Settings(**overrides)  # type: ignore[arg-type]


def prepare_dev(settings: Settings) -> Settings:
    """Data dir, dev signing key and dev KEK (created once, reused after); loopback upstreams allowed."""
    from scailink_mcp.auth import generate_dev_key, public_pem_from_private
    from scailink_mcp.crypto import generate_kek

    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    key_path = data_dir / DEV_KEY_FILE
    if not key_path.exists():
        generate_dev_key(key_path)
    kek_path = data_dir / DEV_KEK_FILE
    if not kek_path.exists():
        kek_path.write_text(generate_kek())
        kek_path.chmod(0o600)
    updates: dict[str, object] = {"data_dir": data_dir, "dev_signing_key_path": key_path}
    if not settings.jwt_public_key and not settings.jwt_jwks_url:
        updates["jwt_public_key"] = public_pem_from_private(key_path)
    if settings.encryption_local_kek is None:
        updates["encryption_local_kek"] = SecretStr(kek_path.read_text().strip())
    if "SCAILINK_ALLOWED_PRIVATE_NETWORKS" not in os.environ:
        updates["allowed_private_networks"] = DEV_LOOPBACK
    return settings.model_copy(update=updates)


def uvicorn_config(settings: Settings, app: Any, **overrides: Any) -> uvicorn.Config:
    """The uvicorn config of `scailink serve`/`dev`; the tests' live server uses it too, with
    `overrides` (e.g. its own port, a shorter graceful-shutdown timeout)."""
    import uvicorn

    from scailink_mcp.desktop.ws_server import WebSocketProtocol

    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": settings.shutdown_grace_s,
        "ws": WebSocketProtocol,  # answers an upgrade over the header limits (431) instead of hanging
        "ws_max_size": settings.ws_max_frame_bytes,  # a larger frame closes with 1009
        "ws_ping_interval": 20.0,
    }
    return uvicorn.Config(app, **(options | overrides))


def _serve(
    settings: Settings,
    prepare: Callable[[Any], None] | None = None,
    *,
    sockets: list[socket.socket] | None = None,
    on_started: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM; `prepare(app)` runs once the app is built, before it serves. A worker of
    `serve --workers N` passes the listening socket its supervisor bound, and `on_started`, called
    once the app is serving."""
    import anyio
    import uvicorn
    from sse_starlette.sse import AppStatus

    from scailink_mcp.app import build_components, create_app
    from scailink_mcp.desktop.protocol import Close

    parts = build_components(settings)

    # sse-starlette would end every SSE stream at SIGTERM, in-flight `tools/call` answers included;
    # `DrainingServer` ends them itself once those answers are out.
    AppStatus.disable_automatic_graceful_drain()  # type: ignore[no-untyped-call]

    class DrainingServer(uvicorn.Server):
        """On SIGTERM: stop accepting, tell desktop clients 1001 (they resume elsewhere), wait for the
        MCP requests in flight to be answered, then end the remaining SSE streams and let uvicorn
        finish the other requests, all within `shutdown_grace_s`, before the lifespan closes the pool."""

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started and on_started is not None:
                on_started()

        async def shutdown(self, sockets: Any = None) -> None:
            for server in self.servers:
                server.close()
            await parts.desktop.close_all(Close.GOING_AWAY, "server shutting down")
            with anyio.move_on_after(settings.shutdown_grace_s):
                await parts.in_flight.wait_idle()
            AppStatus.should_exit = True
            await super().shutdown(sockets)

    app = create_app(settings, parts)
    if prepare is not None:
        prepare(app)
    DrainingServer(uvicorn_config(settings, app)).run(sockets)


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
    _serve(settings, sockets=[sock], on_started=lambda: conn.send_bytes(WORKER_STARTED))


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
    lifespan. Each is the single-process server (`_serve`), with the same `DrainingServer` drain.
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


def cmd_dev(args: argparse.Namespace) -> int:
    from scailink_mcp.auth import mint_token
    from scailink_mcp.banner import dev_banner
    from scailink_mcp.dashboard import find_dashboard
    from scailink_mcp.dashboard.state import DashboardOptions
    from scailink_mcp.db import Database
    from scailink_mcp.demo import start_demo

    logs.configure(os.environ.get("SCAILINK_LOG_LEVEL", "INFO"), human=True)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its start-up chatter says nothing new
    settings = prepare_dev(_settings(args))
    Database(settings.effective_database_url).migrate()
    assert settings.dev_signing_key_path is not None
    token = mint_token(
        settings.dev_signing_key_path.read_bytes(),
        user_id="dev-admin",
        tenant_id="dev",
        groups=["tenant_admin"],
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
        ttl_s=12 * 3600,
    )
    base = settings.public_url or f"http://{settings.host}:{settings.port}"
    token_file = settings.data_dir / "dev_admin_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    ticket = secrets.token_urlsafe(32)
    options = DashboardOptions()
    with ExitStack() as stack:
        demo = None if args.no_demo else start_demo(settings, token, stack)
        banner = dev_banner(
            base=base,
            database=settings.effective_database_url,
            token=token,
            token_file=str(token_file),
            sign_in_url=f"{base}/dashboard/login?ticket={ticket}",
            ticket_minutes=int(options.ticket_ttl_s // 60),
            demo=demo,
        )
        print(banner, flush=True)
        _serve(settings, prepare=lambda app: find_dashboard(app).tickets.add(ticket, token))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from scailink_mcp.db import Database

    settings = _settings(args)
    if args.workers > 1 and (problem := shared_state_problem(settings)) is not None:
        print(f"scailink serve --workers {args.workers}: {problem}", file=sys.stderr)
        return 2
    if args.migrate:  # once, here: never in each worker
        db = Database(settings.effective_database_url)
        db.migrate()
        db.dispose()
    if args.workers > 1:
        return Supervisor(settings, args.workers).run()
    _serve(settings)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from scailink_mcp.db import Database

    settings = _settings(args)
    Database(settings.effective_database_url).migrate()
    print(f"migrations applied to {settings.effective_database_url.split('@')[-1]}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from scailink_mcp.auth import mint_token

    settings = _settings(args)
    key_path = settings.dev_signing_key_path or (settings.data_dir / DEV_KEY_FILE)
    if not key_path.exists():
        print(f"no dev signing key at {key_path}: run `scailink dev` first", file=sys.stderr)
        return 2
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    print(
        mint_token(
            key_path.read_bytes(),
            user_id=args.user,
            tenant_id=args.tenant,
            groups=groups,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            ttl_s=args.ttl,
        )
    )
    return 0


def cmd_kek_generate(args: argparse.Namespace) -> int:
    from scailink_mcp.crypto import generate_kek

    print(generate_kek())
    return 0


KEK_ROTATE_LEASE = "kek-rotate"
KEK_ROTATE_LEASE_TTL_S = 60.0


class RotationLockLost(Exception):
    """Another `kek rotate` took the cluster lock (this one stalled past its TTL), or Redis went away."""


def cmd_kek_rotate(args: argparse.Namespace) -> int:
    from scailink_mcp.crypto import Keyring, rotate_credentials
    from scailink_mcp.db import Database
    from scailink_mcp.remote.oauth_tokens import rotate_tokens

    settings = _settings(args)
    keyring = Keyring.from_settings(settings)
    if keyring is None:
        print("SCAILINK_ENCRYPTION_LOCAL_KEK (the new KEK) is not set", file=sys.stderr)
        return 2
    db = Database(settings.effective_database_url)
    if settings.redis_url:
        return _kek_rotate_locked(settings, db, keyring, args.batch_size)
    count = rotate_credentials(db, keyring, batch_size=args.batch_size)
    count += rotate_tokens(db, keyring, batch_size=args.batch_size)
    print(json.dumps({"rewrapped": count, "kek_id": keyring.primary_id}))
    return 0


def _kek_rotate_locked(settings: Settings, db: Database, keyring: Keyring, batch_size: int) -> int:
    """With several replicas (`SCAILINK_REDIS_URL` set): rotate under the cluster lock `kek-rotate`,
    renewed after every batch, so two operators (or a retry of a job still running) never rotate at
    once. Without Redis the lock cannot be taken, and the rotation is refused (it can wait; rows are
    never at risk, `rotate_credentials` compares each row before rewriting it)."""
    import anyio
    import anyio.from_thread
    import anyio.to_thread

    from scailink_mcp.crypto import rotate_credentials
    from scailink_mcp.leases import RedisLease
    from scailink_mcp.remote.oauth_tokens import rotate_tokens

    url = settings.redis_url
    assert url is not None

    async def rotate() -> int:
        lease = RedisLease(url, prefix=settings.redis_prefix)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lease.run)  # releases the lock when done, however this ends
            try:
                if not await lease.acquire(KEK_ROTATE_LEASE, KEK_ROTATE_LEASE_TTL_S):
                    if lease.unavailable:
                        print("Redis is unreachable: no cluster lock, no rotation", file=sys.stderr)
                    else:
                        holder = await lease.holder(KEK_ROTATE_LEASE)
                        print(f"another `kek rotate` is running ({holder})", file=sys.stderr)
                    return 3

                def renew(_: int) -> None:
                    if not anyio.from_thread.run(lease.acquire, KEK_ROTATE_LEASE, KEK_ROTATE_LEASE_TTL_S):
                        raise RotationLockLost("the cluster lock was lost")

                count = await anyio.to_thread.run_sync(
                    lambda: (
                        rotate_credentials(db, keyring, batch_size=batch_size, after_batch=renew)
                        + rotate_tokens(db, keyring, batch_size=batch_size, after_batch=renew)
                    )
                )
            except RotationLockLost as exc:
                print(f"{exc}: stopped (resumable: run it again)", file=sys.stderr)
                return 3
            finally:
                tg.cancel_scope.cancel()
        print(json.dumps({"rewrapped": count, "kek_id": keyring.primary_id}))
        return 0

    return anyio.run(rotate)


def cmd_openapi(args: argparse.Namespace) -> int:
    from scailink_mcp.openapi import openapi_yaml

    text = openapi_yaml()
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not 1 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scailink", description="ScaiLink MCP gateway")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", dest="data_dir", type=Path)
        p.add_argument("--database-url", dest="database_url")

    dev = sub.add_parser("dev", help="data dir, dev keys, migrations, serve; prints a dev admin token")
    common(dev)
    dev.add_argument("--host")
    dev.add_argument("--port", type=int)
    dev.add_argument("--no-demo", dest="no_demo", action="store_true", help="no built-in demo MCP server")
    dev.set_defaults(func=cmd_dev)

    serve = sub.add_parser("serve", help="serve with the configured settings")
    common(serve)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--migrate", action="store_true", help="apply migrations first")
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="worker processes on one port (more than 1 needs SCAILINK_REDIS_URL)",
    )
    serve.set_defaults(func=cmd_serve)

    migrate = sub.add_parser("migrate", help="apply database migrations")
    common(migrate)
    migrate.set_defaults(func=cmd_migrate)

    token = sub.add_parser("token", help="print a JWT signed by the dev key (local use only)")
    common(token)
    token.add_argument("--user", required=True)
    token.add_argument("--tenant", required=True)
    token.add_argument("--groups", required=True, help="comma-separated, e.g. tenant_admin")
    token.add_argument("--ttl", type=int, default=3600)
    token.set_defaults(func=cmd_token)

    kek = sub.add_parser("kek", help="key-encryption-key tools").add_subparsers(
        dest="kek_command", required=True
    )
    gen = kek.add_parser("generate", help="print a new random KEK (base64 of 32 bytes)")
    gen.set_defaults(func=cmd_kek_generate)
    rotate = kek.add_parser(
        "rotate",
        help="re-wrap every data key under SCAILINK_ENCRYPTION_LOCAL_KEK (old KEKs in "
        "SCAILINK_ENCRYPTION_PREVIOUS_KEKS); resumable, safe while the service runs",
    )
    common(rotate)
    rotate.add_argument("--batch-size", type=int, default=100)
    rotate.set_defaults(func=cmd_kek_rotate)

    desktop = sub.add_parser("desktop", help="the reference desktop client", add_help=False)
    desktop.set_defaults(func=None)

    openapi = sub.add_parser("openapi", help="print the REST contract (registry_api/openapi.yaml)")
    openapi.add_argument("--out")
    openapi.set_defaults(func=cmd_openapi)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["desktop"]:  # its own options: `scailink desktop --help`
        from scailink_mcp.desktop.client import main as desktop_main

        logs.configure(os.environ.get("SCAILINK_LOG_LEVEL", "INFO"))
        return desktop_main(argv[1:])
    args = build_parser().parse_args(argv)
    logs.configure(os.environ.get("SCAILINK_LOG_LEVEL", "INFO"))
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
