"""The `scailink` command: dev, serve (one process, or `--workers N` under a `Supervisor`), migrate,
token, kek generate|rotate, openapi."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

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


def cmd_dev(args: argparse.Namespace) -> int:
    from scailink_mcp.auth import mint_token
    from scailink_mcp.banner import dev_banner
    from scailink_mcp.dashboard import find_dashboard
    from scailink_mcp.dashboard.state import DashboardOptions
    from scailink_mcp.db import Database
    from scailink_mcp.demo import start_demo
    from scailink_mcp.serving import serve

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
        serve(settings, prepare=lambda app: find_dashboard(app).tickets.add(ticket, token))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from scailink_mcp.db import Database
    from scailink_mcp.serving import serve
    from scailink_mcp.supervisor import Supervisor, shared_state_problem

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
    serve(settings)
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
