"""The tables, as SQLAlchemy models. Table and column names are a contract: users' SQL and the views use them.

Every constraint and index has an explicit name, the one PostgreSQL itself would choose where it has a
rule, so that migrations written by hand and `create_all` produce the same schema.
"""

import datetime
import uuid
from typing import Any

from sqlalchemy import (
    DDL,
    REAL,
    BigInteger,
    CheckConstraint,
    Column,
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
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    event,
    func,
)
from sqlalchemy import text as sql_text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from icldaemon.columns import DYNAMICS_NAMES

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
    # the session user that stored it (revision 0009): a prompt retrieves only its own submitter's memories
    submitted_by: Mapped[str | None] = mapped_column(server_default=sql_text("session_user"))


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
    # the session user that inserted it (revision 0008): the submitter reads its own through icl_own_prompts
    submitted_by: Mapped[str | None] = mapped_column(server_default=sql_text("session_user"))


class MemoryRetrieval(Base):
    __tablename__ = "memory_retrievals"
    __table_args__ = (
        # Consolidation reads every retrieval of one memory.
        Index("memory_retrievals_memory_id_idx", "memory_id"),
        CheckConstraint("rank >= 1", name="rank"),
        CheckConstraint("score > '-Infinity' AND score < 'Infinity'", name="score"),  # NaN is above Infinity
    )

    prompt_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("prompts.id", ondelete="CASCADE"), primary_key=True
    )
    memory_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("memories.id"), primary_key=True)
    rank: Mapped[int]
    score: Mapped[float | None]


class IclDynamicsLayers(Base):
    """One row per (measurement run, layer): the six quantities over the run's context tokens, float32 arrays.

    Entry i of each array is context token i (NULL where a stride skipped the prefix). Users read these
    rows through the view icl_dynamics_log, one row per (run, layer, token). Arrays per (run, layer)
    rather than a row per value: what is the same for a whole run is stored once (icl_dynamics_tokens,
    measurement_runs) and the values at the float32 the measurement carries, which bench/bench_storage.py
    measures (README.md#database). Partitioned by month of created_at, like icl_dynamics_tokens, so that
    the retention drops whole partitions.
    """

    # A table rather than annotated columns, so that its array columns come from the contract.
    __table__ = Table(
        "icl_dynamics_layers",
        Base.metadata,
        Column("run_id", BigInteger, primary_key=True),
        Column("layer_idx", Integer, primary_key=True),
        # the partition key belongs to every unique key of a partitioned table; one run has one time
        Column("created_at", DateTime(timezone=True), primary_key=True, server_default=func.now()),
        *(Column(name, ARRAY(REAL), nullable=False) for name in DYNAMICS_NAMES),  # each [context_tokens]
        # A run's rows are found by run_id (the primary key's prefix); times only grow, so a block-range
        # index serves a time range for almost nothing.
        Index("icl_dynamics_layers_created_at_brin", "created_at", postgresql_using="brin"),
        postgresql_partition_by="RANGE (created_at)",
    )


class IclDynamicsTokens(Base):
    """One row per measurement run: its context tokens' position in the prompt, text, segment and memory.

    Entry i of each array is context token i, as in icl_dynamics_layers; partitioned by month alike.
    """

    __tablename__ = "icl_dynamics_tokens"
    __table_args__ = ({"postgresql_partition_by": "RANGE (created_at)"},)

    run_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    created_at: Mapped[datetime.datetime] = mapped_column(primary_key=True, server_default=func.now())
    token_position: Mapped[list[int]] = mapped_column(ARRAY(Integer))  # [context_tokens]
    token_text: Mapped[list[str]] = mapped_column(ARRAY(Text))  # [context_tokens]
    segment: Mapped[list[str | None]] = mapped_column(ARRAY(Text))  # [context_tokens]
    memory_id: Mapped[list[int | None]] = mapped_column(ARRAY(BigInteger))  # [context_tokens]


# The quantities' arrays are stored out of line without compression: float32 measurements do not
# compress, and trying costs every write. Partitions inherit it.
for _column in DYNAMICS_NAMES:
    event.listen(IclDynamicsLayers.__table__, "after_create",
                 DDL(f"ALTER TABLE icl_dynamics_layers ALTER COLUMN {_column} SET STORAGE EXTERNAL"))

# One row per (measurement run, layer, context token), with the run's own columns from measurement_runs
# and prompts: the columns of the original brief, as a view over the arrays. The set-returning functions
# sit in the select list, where PostgreSQL steps through the arrays together without materialising each
# one, and the joins sit beside them, so that a filter on any column that is not an array's element
# (run_id, layer_idx, session_id, model, prompt_id, created_at) is applied before any array is unnested:
# a run's rows through the primary key, a session's through prompts and measurement_runs.
ICL_DYNAMICS_LOG_VIEW = f"""
CREATE VIEW icl_dynamics_log AS
SELECT layers.run_id,
       runs.prompt_id,
       prompts.session_id,
       runs.prompt_hash,
       runs.model,
       layers.layer_idx,
       generate_subscripts(layers.{DYNAMICS_NAMES[0]}, 1) - 1 AS token_idx,
       unnest(tokens.token_position) AS token_position,
       unnest(tokens.token_text) AS token_text,
       unnest(tokens.segment) AS segment,
       unnest(tokens.memory_id) AS memory_id,
{"".join(f"       unnest(layers.{name})::double precision AS {name},{chr(10)}" for name in DYNAMICS_NAMES)}\
       layers.created_at
FROM icl_dynamics_layers AS layers
LEFT JOIN icl_dynamics_tokens AS tokens ON tokens.run_id = layers.run_id AND tokens.created_at = layers.created_at
LEFT JOIN measurement_runs AS runs ON runs.id = layers.run_id
LEFT JOIN prompts ON prompts.id = runs.prompt_id
"""
event.listen(Base.metadata, "after_create", DDL(ICL_DYNAMICS_LOG_VIEW))
event.listen(Base.metadata, "before_drop", DDL("DROP VIEW IF EXISTS icl_dynamics_log"))


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
    # Which definition of prefixes, anchor and removal produced the run: 1, 2 or 3, the current one
    # (engine/result.py METHOD_VERSION; each defined in docs/method.md §5); views and consolidation never
    # mix versions. Added by migration 0005, hence last.
    method_version: Mapped[int] = mapped_column(SmallInteger)
    # sha256 of the token ids (little-endian int64): the same for every row of the run, so stored once
    # here and joined into icl_dynamics_log. Added by migration 0007, hence last.
    prompt_hash: Mapped[str | None]


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
    float16 little-endian [num_layers, positions, d_model] each (docs/method.md §7.1).
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
    # measured like model edits (docs/method.md §7.3).
    method: Mapped[str]  # 'down_projection' or 'distillation'; 'gate_up_bias': listed and loadable, not fitted
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

# The status of the prompts the current session user submitted (revision 0008): what the submitter role reads.
ICL_OWN_PROMPTS_VIEW = """
CREATE VIEW icl_own_prompts AS
SELECT id, session_id, status, attempts, last_error, created_at, started_at, finished_at
FROM prompts
WHERE submitted_by = session_user
"""
event.listen(Base.metadata, "after_create", DDL(ICL_OWN_PROMPTS_VIEW))
event.listen(Base.metadata, "before_drop", DDL("DROP VIEW IF EXISTS icl_own_prompts"))


class IclConfig(Base):
    """The schema owner's settings (revision 0009), one row: only the owner writes it, every role reads it."""

    __tablename__ = "icl_config"
    __table_args__ = (
        CheckConstraint("id", name="one_row"),
        CheckConstraint("retention_days > 0 AND retention_days < 'Infinity'", name="retention"),
        CheckConstraint("max_text_bytes > 0 AND max_messages > 0 AND max_content_bytes > 0 AND max_key_bytes > 0 "
                        "AND max_retrievals >= 0", name="bounds"),
        CheckConstraint("min_priority <= max_priority", name="priority_range"),
        {"comment": "The schema owner's settings: the log's retention and the bounds on what clients insert. One row."},
    )

    id: Mapped[bool] = mapped_column(primary_key=True, server_default=sql_text("true"))
    # days after its month ends that a monthly partition of the log is dropped; NULL keeps the log forever
    retention_days: Mapped[float | None]
    max_text_bytes: Mapped[int] = mapped_column(server_default=sql_text("1048576"))  # a prompt's text or messages
    max_messages: Mapped[int] = mapped_column(server_default=sql_text("256"))
    max_content_bytes: Mapped[int] = mapped_column(server_default=sql_text("65536"))  # a memory's content
    max_key_bytes: Mapped[int] = mapped_column(server_default=sql_text("1024"))  # a memory's key
    max_retrievals: Mapped[int] = mapped_column(server_default=sql_text("64"))  # memories retrieved for one prompt
    min_priority: Mapped[int] = mapped_column(server_default=sql_text("-1000"))
    max_priority: Mapped[int] = mapped_column(server_default=sql_text("1000"))
    # whether a prompt may retrieve memories another submitter stored
    share_memories: Mapped[bool] = mapped_column(server_default=sql_text("false"))
