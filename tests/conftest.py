"""Shared fixtures: real databases (a SQLite file; PostgreSQL when reachable), dev keys and tokens,
the app served in-process (`AppHarness`) or over real HTTP on 127.0.0.1 (`LiveApp`)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from pydantic import SecretStr

from scailink_mcp.app import Components, build_components, create_app
from scailink_mcp.auth import generate_dev_key, mint_token, public_pem_from_private
from scailink_mcp.config import Settings
from scailink_mcp.crypto import generate_kek
from scailink_mcp.db import Database
from scailink_mcp.serving import uvicorn_config
from tests.servers import HOST, ThreadedServer

PG_ADMIN_DSN = os.environ.get(
    "SCAILINK_TEST_POSTGRES_DSN", "host=127.0.0.1 port=5432 dbname=test user=postgres"
)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def _postgres_available() -> str | None:
    try:
        with psycopg.connect(PG_ADMIN_DSN, connect_timeout=3) as conn:
            conn.execute("select 1")
        return None
    except Exception as exc:
        return f"PostgreSQL not reachable at 127.0.0.1:5432 ({type(exc).__name__})"


@pytest.fixture(scope="session")
def postgres_reason() -> str | None:
    reason = _postgres_available()
    if reason and os.environ.get("SCAILINK_TEST_REQUIRE_POSTGRES"):
        pytest.fail(f"{reason}, but SCAILINK_TEST_REQUIRE_POSTGRES is set (CI)")
    return reason


def _pg_url(dbname: str) -> str:
    params = dict(part.split("=", 1) for part in PG_ADMIN_DSN.split())
    return (
        f"postgresql+psycopg://{params.get('user', 'postgres')}@{params.get('host', '127.0.0.1')}:"
        f"{params.get('port', '5432')}/{dbname}"
    )


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'scailink.db'}"


@pytest.fixture
def postgres_url(postgres_reason: str | None) -> Iterator[str]:
    """A fresh PostgreSQL database per test, dropped afterwards."""
    if postgres_reason:
        pytest.skip(postgres_reason)
    name = f"scailink_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _pg_url(name)
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def mariadb_reason() -> str | None:
    try:
        import pymysql

        pymysql.connect(host="127.0.0.1", port=3306, user="root", connect_timeout=3).close()
        return None
    except Exception as exc:
        reason = f"MariaDB not reachable at 127.0.0.1:3306 ({type(exc).__name__})"
    if os.environ.get("SCAILINK_TEST_REQUIRE_MARIADB"):
        pytest.fail(f"{reason}, but SCAILINK_TEST_REQUIRE_MARIADB is set (CI)")
    return reason


@pytest.fixture
def mariadb_url(mariadb_reason: str | None) -> Iterator[str]:
    """A fresh MariaDB database per test, dropped afterwards."""
    if mariadb_reason:
        pytest.skip(mariadb_reason)
    import pymysql

    name = f"scailink_t_{uuid.uuid4().hex[:12]}"
    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        yield f"mysql+pymysql://root@127.0.0.1:3306/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Parametrizes a test over the real databases."""
    fixture = {"sqlite": "sqlite_url", "postgresql": "postgres_url", "mariadb": "mariadb_url"}[request.param]
    url: str = request.getfixturevalue(fixture)
    return url


@pytest.fixture(scope="session")
def dev_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "dev_signing_key.pem"
    generate_dev_key(path)
    return path


TokenFactory = Callable[..., str]


@pytest.fixture(scope="session")
def token(dev_key: Path) -> TokenFactory:
    private = dev_key.read_bytes()

    def make(
        user: str = "u1", tenant: str = "t1", groups: tuple[str, ...] = ("tenant_admin",), **kw: Any
    ) -> str:
        return mint_token(
            private, user_id=user, tenant_id=tenant, groups=list(groups), audience="scailink", **kw
        )

    return make


def auth_headers(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


@pytest.fixture
def settings_factory(dev_key: Path, tmp_path: Path, sqlite_url: str) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": tmp_path,
            "database_url": sqlite_url,
            "jwt_public_key": public_pem_from_private(dev_key),
            "encryption_local_kek": SecretStr(generate_kek()),
            "allowed_private_networks": ["127.0.0.0/8", "::1/128"],
            "background_tasks": False,
            "discovery_timeout_s": 10.0,
            "health_timeout_s": 3.0,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return make


class AppHarness:
    """The app with its lifespan running and an HTTP client bound to it in-process."""

    def __init__(self, app: Any, parts: Components, client: httpx.AsyncClient) -> None:
        self.app = app
        self.parts = parts
        self.client = client


@asynccontextmanager
async def start_app(settings: Settings) -> AsyncIterator[AppHarness]:
    db = Database(settings.effective_database_url)
    db.migrate()
    parts = build_components(settings, db)
    app = create_app(settings, parts)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://scailink.test") as client,
    ):
        yield AppHarness(app, parts, client)


@pytest.fixture
async def harness(settings_factory: Callable[..., Settings]) -> AsyncIterator[AppHarness]:
    async with start_app(settings_factory()) as h:
        yield h


class LiveApp(ThreadedServer):
    """The app served by a real uvicorn on 127.0.0.1 in a thread (for MCP clients over real HTTP)."""

    def __init__(self, settings: Settings) -> None:
        db = Database(settings.effective_database_url)
        db.migrate()
        self.parts = build_components(settings, db)
        self.app = create_app(settings, self.parts)
        config = uvicorn_config(
            settings, self.app, host=HOST, port=0, lifespan="on", timeout_graceful_shutdown=5
        )
        super().__init__(config)
        self.mcp_url = f"{self.base_url}/mcp"


@pytest.fixture
def live(settings_factory: Callable[..., Settings]) -> Iterator[LiveApp]:
    with LiveApp(settings_factory()) as app:
        yield app
