"""The tables, as SQLAlchemy models. Table and column names are a contract: users' SQL and the views use them.

Every constraint and index has an explicit name, the one PostgreSQL itself would choose where it has a
rule, so that migrations written by hand and `create_all` produce the same schema.
"""

import datetime
import uuid
from typing import Any

from sqlalchemy import (
    SmallInteger,
    BigInteger,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    Text,
    UniqueConstraint,
    Uuid,
    func,
)
from sqlalchemy import text as sql_text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "pk": "%(table_name)s_pkey",
    "fk": "%(table_name)s_%(column_0_name)s_fkey",
    "uq": "%(table_name)s_%(column_0_N_name)s_key",
    "ck": "%(table_name)s_%(constraint_name)s_check",
    "ix": "%(table_name)s_%(column_0_N_name)s_idx",
}


BRIN_PAGES_PER_RANGE = 8  # pages of icl_dynamics_log per BRIN summary (as in migration 0001)


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
    # The claim: who holds a running prompt and until when; a queued prompt waits for next_attempt_at.
    lease_expires_at: Mapped[datetime.datetime | None]
    worker_id: Mapped[str | None]
    next_attempt_at: Mapped[datetime.datetime | None]


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
        # An append-only log written by COPY: a run's rows are contiguous and run ids and times only
        # grow, so block-range (BRIN) indexes find a run or a time range for almost no write cost. A
        # primary key, an identity column and btrees on it held COPY to less than half the rate.
        # Filter sessions through measurement_runs/prompts and join on run_id.
        Index("icl_dynamics_log_run_id_brin", "run_id", postgresql_using="brin",
              postgresql_with={"pages_per_range": BRIN_PAGES_PER_RANGE}),
        Index("icl_dynamics_log_created_at_brin", "created_at", postgresql_using="brin"),
        {"postgresql_partition_by": "RANGE (created_at)"},
    )
    # No primary key in the database; the ORM needs one to map rows, and this triple is unique.
    __mapper_args__ = {"primary_key": ("run_id", "layer_idx", "token_idx")}

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


class MeasurementRun(Base):
    """One measurement of one prompt: the model, token counts, timings and the exactness check."""

    __tablename__ = "measurement_runs"
    __table_args__ = (Index("measurement_runs_prompt_id_idx", "prompt_id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    prompt_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("prompts.id", ondelete="CASCADE"))
    model: Mapped[str]
    dtype: Mapped[str | None]
    device: Mapped[str | None]
    num_layers: Mapped[int]
    total_tokens: Mapped[int]
    context_tokens: Mapped[int]
    anchor_tokens: Mapped[int]
    query_position: Mapped[int]
    stride: Mapped[int]
    plain_forward_s: Mapped[float | None]
    measure_s: Mapped[float | None]
    max_abs_logit_error: Mapped[float | None]
    exactness_kl: Mapped[float | None]
    context_kl: Mapped[float | None]
    created_at: Mapped[datetime.datetime] = mapped_column(server_default=func.now())
    # Which definition of prefixes and removal produced the run (docs/method.md; added by migration 0005,
    # hence last): 1 left gaps in the positions, 2 measures prompts that could be sent.
    method_version: Mapped[int] = mapped_column(SmallInteger)


class MemoryEffect(Base):
    """What removing one retrieved memory from one prompt's context changes, per measurement run."""

    __tablename__ = "memory_effects"
    __table_args__ = (Index("memory_effects_memory_id_idx", "memory_id"),)

    run_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("measurement_runs.id", ondelete="CASCADE"), primary_key=True
    )
    memory_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("memories.id"), primary_key=True)
    segment: Mapped[str]
    token_start: Mapped[int]
    token_end: Mapped[int]
    kl: Mapped[float | None]
    max_abs_logit_error: Mapped[float | None]
    patched_kl: Mapped[float | None]
    update_frobenius_norm: Mapped[list[float]] = mapped_column(ARRAY(Double))  # [num_layers]
    bias_update_norm: Mapped[list[float]] = mapped_column(ARRAY(Double))  # [num_layers]
    created_at: Mapped[datetime.datetime] = mapped_column(server_default=func.now())


class MemoryPatch(Base):
    """The rank-1 factors of one memory's exact patch for one query: float32 little-endian [num_layers, d_model]."""

    __tablename__ = "memory_patches"
    __table_args__ = (Index("memory_patches_memory_id_idx", "memory_id"),)

    run_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("measurement_runs.id", ondelete="CASCADE"), primary_key=True
    )
    memory_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("memories.id"), primary_key=True)
    model: Mapped[str]
    num_layers: Mapped[int]
    d_model: Mapped[int]
    delta: Mapped[bytes] = mapped_column(LargeBinary)
    a_tilde: Mapped[bytes] = mapped_column(LargeBinary)
    bias_delta: Mapped[bytes] = mapped_column(LargeBinary)
    consolidated_at: Mapped[datetime.datetime | None]
    created_at: Mapped[datetime.datetime] = mapped_column(server_default=func.now())
    # A fingerprint of the weights the patch was measured on (added by migration 0003, hence last):
    # patches of another revision never mix in one adapter.
    model_revision: Mapped[str | None]


class MemoryAnswerPatch(Base):
    """One memory's exact patch at each answer position of one query, in the down projection's space.

    The model's greedy answer with the memory in context (`answer_ids`), and per layer and answer
    position the MLP input without the memory (`a_tilde`) and the layer-output change (`value`):
    float16 little-endian [num_layers, positions, d_model] each (docs/method.md §7).
    """

    __tablename__ = "memory_answer_patches"
    __table_args__ = (Index("memory_answer_patches_memory_id_idx", "memory_id"),)

    run_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("measurement_runs.id", ondelete="CASCADE"), primary_key=True
    )
    memory_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("memories.id"), primary_key=True)
    model: Mapped[str]
    model_revision: Mapped[str | None]
    num_layers: Mapped[int]
    d_model: Mapped[int]
    answer_ids: Mapped[list[int]] = mapped_column(ARRAY(Integer))
    a_tilde: Mapped[bytes] = mapped_column(LargeBinary)
    value: Mapped[bytes] = mapped_column(LargeBinary)
    max_abs_log_prob_error: Mapped[float | None]
    created_at: Mapped[datetime.datetime] = mapped_column(server_default=func.now())


class Adapter(Base):
    """One consolidated version of a scope's patches: a PEFT LoRA directory on disk and its fidelity.

    `scope_key` names the group ("memory:12", "session:<uuid>", "all"); versions count up per model
    and scope. The fidelity columns are measured on held-out patches (queries not used in the fit):
    KL(p(.|C) || p(.|C without the memories)) and the same with the static patch applied, at the
    query position only ("query") or at every position as the LoRA adapter applies it ("all").
    """

    __tablename__ = "adapters"
    __table_args__ = (
        CheckConstraint("scope IN ('memory', 'session', 'all')", name="scope"),
        CheckConstraint("status IN ('accepted', 'rejected')", name="status"),
        UniqueConstraint("model", "scope_key", "version", name="adapters_model_scope_key_version_key"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    scope: Mapped[str]
    scope_key: Mapped[str]
    memory_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("memories.id", ondelete="SET NULL"))
    session_id: Mapped[uuid.UUID | None]
    model: Mapped[str]
    model_revision: Mapped[str | None]
    version: Mapped[int]
    layers: Mapped[list[int]] = mapped_column(ARRAY(Integer))
    rank: Mapped[int]
    ridge: Mapped[float]
    patch_count: Mapped[int]
    held_out_count: Mapped[int]
    path: Mapped[str]
    kl_without: Mapped[float | None]
    kl_adapter_query: Mapped[float | None]
    kl_adapter_all: Mapped[float | None]
    recovered_query: Mapped[float | None]
    recovered_all: Mapped[float | None]
    greedy_match_query: Mapped[float | None]
    greedy_match_all: Mapped[float | None]
    created_at: Mapped[datetime.datetime] = mapped_column(server_default=func.now())
    # Added by migration 0006, hence last: the method, the quality gate's verdict, and the figures
    # measured like model edits (docs/method.md §7).
    method: Mapped[str]  # 'down_projection'; 'gate_up_bias' for versions before 0006
    status: Mapped[str]  # 'accepted' or 'rejected'; only accepted versions are current
    status_reason: Mapped[str | None]
    answer_examples: Mapped[int | None]
    with_memory_rate: Mapped[float | None]
    without_memory_rate: Mapped[float | None]
    adapter_rate: Mapped[float | None]
    answer_kl_without: Mapped[float | None]
    answer_kl_adapter: Mapped[float | None]
    neutral_prompts: Mapped[int | None]
    neutral_kl: Mapped[float | None]
    neutral_next_token_unchanged: Mapped[float | None]
    neutral_continuation_unchanged: Mapped[float | None]
    leak_examples: Mapped[int | None]
    leak_rate: Mapped[float | None]
    next_token_kl_share: Mapped[float | None]
    preservation: Mapped[float | None]
    fit_seconds: Mapped[float | None]


class AdapterPatch(Base):
    """Which memory patches an adapter version was fitted on ('fit') or checked against ('held_out')."""

    __tablename__ = "adapter_patches"
    __table_args__ = (
        CheckConstraint("role IN ('fit', 'held_out')", name="role"),
        ForeignKeyConstraint(["run_id", "memory_id"], ["memory_patches.run_id", "memory_patches.memory_id"],
                             name="adapter_patches_run_id_fkey", ondelete="CASCADE"),
        Index("adapter_patches_run_id_memory_id_idx", "run_id", "memory_id"),
    )

    adapter_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True
    )
    run_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    memory_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    role: Mapped[str]
