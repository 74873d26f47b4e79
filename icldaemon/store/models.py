"""The tables, as SQLAlchemy models. Table and column names are a contract: users' SQL and the views use them.

Every constraint and index has an explicit name, the one PostgreSQL itself would choose where it has a
rule, so that migrations written by hand and `create_all` produce the same schema.
"""

import datetime
import uuid
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Text,
    Uuid,
    func,
)
from sqlalchemy import text as sql_text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "pk": "%(table_name)s_pkey",
    "fk": "%(table_name)s_%(column_0_name)s_fkey",
    "uq": "%(table_name)s_%(column_0_N_name)s_key",
    "ck": "%(table_name)s_%(constraint_name)s_check",
    "ix": "%(table_name)s_%(column_0_N_name)s_idx",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime.datetime: DateTime(timezone=True),
        dict[str, Any]: JSONB,
        list[dict[str, Any]]: JSONB,
        uuid.UUID: Uuid(as_uuid=True),
        str: Text,
        int: Integer,
        float: Double,
    }


class Memory(Base):
    __tablename__ = "memories"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    key: Mapped[str | None]
    content: Mapped[str]
    # `metadata` is taken by the declarative base; the column keeps its name.
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata")
    created_at: Mapped[datetime.datetime] = mapped_column(server_default=func.now())


class Prompt(Base):
    __tablename__ = "prompts"
    __table_args__ = (
        CheckConstraint(
            "status IN ('queued', 'running', 'done', 'failed')",
            name="status",
        ),
        CheckConstraint(
            "(messages IS NULL) <> (text IS NULL)",
            name="messages_xor_text",
        ),
        # The claim query: WHERE status = 'queued' ORDER BY priority DESC, created_at, id.
        Index(
            "prompts_queued_claim_idx",
            sql_text("priority DESC"),
            "created_at",
            "id",
            postgresql_where=sql_text("status = 'queued'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    session_id: Mapped[uuid.UUID | None]
    # Chat messages [{"role": ..., "content": ...}, ...] or plain text: exactly one of the two.
    messages: Mapped[list[dict[str, Any]] | None]
    text: Mapped[str | None]
    status: Mapped[str] = mapped_column(server_default=sql_text("'queued'"))
    priority: Mapped[int] = mapped_column(server_default=sql_text("0"))
    attempts: Mapped[int] = mapped_column(server_default=sql_text("0"))
    last_error: Mapped[str | None]
    created_at: Mapped[datetime.datetime] = mapped_column(server_default=func.now())
    started_at: Mapped[datetime.datetime | None]
    finished_at: Mapped[datetime.datetime | None]


class MemoryRetrieval(Base):
    __tablename__ = "memory_retrievals"
    __table_args__ = (
        # Consolidation reads every retrieval of one memory.
        Index("memory_retrievals_memory_id_idx", "memory_id"),
    )

    prompt_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("prompts.id", ondelete="CASCADE"), primary_key=True
    )
    memory_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("memories.id"), primary_key=True)
    rank: Mapped[int]
    score: Mapped[float | None]


class IclDynamicsLog(Base):
    """One row per (measurement run, layer, context token). Partitioned by month of created_at."""

    __tablename__ = "icl_dynamics_log"
    __table_args__ = (
        # A partitioned table's key must include the partition column.
        PrimaryKeyConstraint("id", "created_at"),
        Index("icl_dynamics_log_run_id_layer_idx_token_idx_idx", "run_id", "layer_idx", "token_idx"),
        Index("icl_dynamics_log_session_id_idx", "session_id"),
        Index("icl_dynamics_log_created_at_idx", "created_at"),
        {"postgresql_partition_by": "RANGE (created_at)"},
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True))
    run_id: Mapped[int] = mapped_column(BigInteger)
    prompt_id: Mapped[int | None] = mapped_column(BigInteger)
    session_id: Mapped[uuid.UUID | None]
    prompt_hash: Mapped[str | None]
    model: Mapped[str | None]
    layer_idx: Mapped[int]
    token_idx: Mapped[int]
    token_position: Mapped[int | None]
    token_text: Mapped[str | None]
    segment: Mapped[str | None]
    memory_id: Mapped[int | None] = mapped_column(BigInteger)
    delta_norm: Mapped[float | None]
    update_frobenius_norm: Mapped[float | None]
    marginal_update_norm: Mapped[float | None]
    cumulative_update_norm: Mapped[float | None]
    implicit_learning_rate: Mapped[float | None]
    bias_update_norm: Mapped[float | None]
    created_at: Mapped[datetime.datetime] = mapped_column(server_default=func.now())
