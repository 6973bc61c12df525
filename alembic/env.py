"""Alembic environment: the URL comes from Settings, the metadata from the models."""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection

from alembic import context
from sentiment.config import get_settings
from sentiment.models import Base

config = context.config
target_metadata = Base.metadata


def _partition_names(connection: Connection) -> set[str]:
    """Partitions of raw_events: made by the partition keeper, not by migrations."""
    rows = connection.execute(
        text("SELECT c.relname FROM pg_class c WHERE c.relispartition")
    ).scalars()
    return set(rows)


def _make_filter(partitions: set[str]) -> Any:
    def include_object(
        obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
    ) -> bool:
        if type_ == "table" and reflected and compare_to is None:
            # Partitions and TimescaleDB's own tables are not ours to compare.
            return name not in partitions and name != "alembic_version"
        if type_ == "index" and reflected and compare_to is None and name is not None:
            # A partition's index is a copy of its parent's; TimescaleDB names its
            # default time index <table>_<column>_idx. Neither is in the models.
            return not name.endswith("_idx")
        return True

    return include_object


def run_migrations_offline() -> None:
    context.configure(
        url=get_settings().database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # handed in by a caller (tests, the CLI)
        _run(connection)
        return
    engine = create_engine(get_settings().database_url())
    with engine.connect() as connection:
        _run(connection)
    engine.dispose()


def _run(connection: Connection) -> None:
    # Never queue behind a long transaction holding a lock on raw_events while
    # taking an exclusive lock ourselves: fail fast and let the operator retry.
    connection.execute(text("SET lock_timeout = '10s'"))
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_object=_make_filter(_partition_names(connection)),
        compare_type=True,
        compare_server_default=True,
    )
    with context.begin_transaction():
        context.run_migrations()
    if connection.in_transaction():
        connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
