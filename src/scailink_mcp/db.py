"""Database engine and sessions.

The engine is synchronous SQLAlchemy (SQLite, PostgreSQL via psycopg, MariaDB); async code reaches it
through `Database.run`, which runs a function with a session in a worker thread. The MCP hot path
never calls this module: it reads caches that registry events keep current.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread
from sqlalchemy import Engine, create_engine, event, inspect
from sqlmodel import Session

T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy, not the driver, emit BEGIN (see `_begin_immediate`).
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn: Any) -> None:
            # A deferred transaction that reads and then writes can fail at once with SQLITE_BUSY under
            # WAL when another writer got in between; taking the write lock up front makes concurrent
            # writers queue on busy_timeout instead (the tenant cap relies on it).
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


class Database:
    """Owns the engine; hands out sessions; runs blocking work off the event loop."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    async def run(self, fn: Callable[[Session], T]) -> T:
        """Run `fn(session)` in a worker thread; the caller commits inside `fn` when it writes."""

        def _call() -> T:
            with self.session() as session:
                return fn(session)

        return await anyio.to_thread.run_sync(_call)

    def migrate(self) -> None:
        """Apply alembic migrations up to head."""
        from alembic import command

        command.upgrade(alembic_config(self.url), "head")

    def is_migrated(self) -> bool:
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        heads = set(ScriptDirectory.from_config(alembic_config(self.url)).get_heads())
        with self.engine.connect() as conn:
            current = set(MigrationContext.configure(conn).get_current_heads())
        return current == heads

    def table_names(self) -> list[str]:
        return inspect(self.engine).get_table_names()

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg
