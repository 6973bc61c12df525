"""SQLAlchemy 2.0 typed models. Alembic migrations, not these, create the tables."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Identity,
    Index,
    MetaData,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["NAMING_CONVENTION", "Base", "IngestedBatch", "RawEvent", "RejectedEvent"]

# Stable constraint names, so migrations never depend on what the server invents.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

utc_timestamp = Annotated[datetime, mapped_column(DateTime(timezone=True))]
utc_now = Annotated[datetime, mapped_column(DateTime(timezone=True), server_default=text("now()"))]
false_default = Annotated[bool, mapped_column(Boolean, server_default=text("false"))]


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSONB}


class RawEvent(Base):
    """One Reddit submission or comment; a hypertable (or partitioned table) on occurred_at."""

    __tablename__ = "raw_events"

    # The partition column must be part of every unique key on a hypertable or a
    # partitioned table, hence (id, occurred_at) rather than id alone.
    id: Mapped[str] = mapped_column(Text, primary_key=True)
    occurred_at: Mapped[utc_timestamp] = mapped_column(primary_key=True)
    source: Mapped[str] = mapped_column(Text)
    source_id: Mapped[str] = mapped_column(Text)
    event_type: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]]
    ingested_at: Mapped[utc_now]
    processed: Mapped[false_default]
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Why a sentiment worker set the row aside unscored (`processing.set_aside`);
    # NULL for every row that was scored, or not yet processed.
    process_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        # Per-subreddit time queries, and the newest stored item of a kind (the
        # scraper's watermark when Redis has lost it).
        # A btree reads backwards as fast as forwards, so no DESC is needed.
        Index(None, "source_id", "event_type", "occurred_at"),
        # Sentiment workers claim unprocessed rows oldest first; the partial
        # index stays small because processed rows drop out of it.
        Index(
            "ix_raw_events_unprocessed",
            "occurred_at",
            postgresql_where=text("NOT processed"),
        ),
        # The few rows set aside, found without reading the rest.
        Index(
            "ix_raw_events_set_aside",
            "occurred_at",
            postgresql_where=text("process_error IS NOT NULL"),
        ),
    )


class RejectedEvent(Base):
    """A record the database refused, kept with the reason instead of sinking its batch."""

    __tablename__ = "rejected_events"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    event_id: Mapped[str | None] = mapped_column(Text)
    source_id: Mapped[str | None] = mapped_column(Text)
    occurred_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    reason: Mapped[str] = mapped_column(Text)
    # The record as JSON with every non-ASCII character escaped, so even a NUL
    # or a lone surrogate that the database refused survives here as text.
    record: Mapped[str] = mapped_column(Text)
    rejected_at: Mapped[utc_now]

    # Once per record, however often a re-run or a re-scrape offers it again.
    __table_args__ = (UniqueConstraint("event_id", "occurred_at"),)


class IngestedBatch(Base):
    """What one chunk of a batch inserted, written in the same transaction as the rows.

    A task that dies after its insert committed runs again; it then finds the
    chunk here and hands on the same new rows, instead of seeing only
    conflicts and never exporting them.
    """

    __tablename__ = "ingested_batches"

    batch_id: Mapped[str] = mapped_column(Text, primary_key=True)
    first_row: Mapped[int] = mapped_column(primary_key=True)
    last_row: Mapped[int] = mapped_column(primary_key=True)
    new_keys: Mapped[list[Any]] = mapped_column(JSONB)
    rejected: Mapped[int]
    created_at: Mapped[utc_now]
