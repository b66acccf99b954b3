"""Migrations: upgrade an empty database to head on every real database, and the models match them."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import SQLModel

import scailink_mcp.models  # noqa: F401  (registers the tables)
from scailink_mcp.db import Database


def test_upgrade_from_empty_and_models_match(database_url: str) -> None:
    db = Database(database_url)
    assert not db.is_migrated()
    db.migrate()
    assert db.is_migrated()
    db.migrate()  # idempotent
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diff == [], f"models and migrations disagree: {diff}"
    db.dispose()


def test_upgrade_from_the_previous_revision(database_url: str) -> None:
    from alembic import command

    from scailink_mcp.db import alembic_config

    db = Database(database_url)
    command.upgrade(alembic_config(database_url), "0001")
    assert not db.is_migrated() and "audit_event" not in db.table_names()
    db.migrate()
    assert db.is_migrated() and {"audit_event", "custom_role"} <= set(db.table_names())
    db.dispose()
