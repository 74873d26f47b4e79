"""The initial schema: memories, prompts, memory_retrievals and the partitioned icl_dynamics_log.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMPTZ = sa.DateTime(timezone=True)
BRIN_PAGES_PER_RANGE = 8  # pages of icl_dynamics_log per BRIN summary: a few runs' rows at most


# Every name is explicit and wrapped in op.f() so that no naming convention rewrites it.


def upgrade() -> None:
    op.create_table(
        "memories",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("key", sa.Text(), nullable=True),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("metadata", postgresql.JSONB(), nullable=True),
        sa.Column("created_at", TIMESTAMPTZ, server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("memories_pkey")),
    )

    op.create_table(
        "prompts",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("session_id", sa.Uuid(), nullable=True),
        sa.Column("messages", postgresql.JSONB(), nullable=True),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), server_default=sa.text("'queued'"), nullable=False),
        sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", TIMESTAMPTZ, server_default=sa.text("now()"), nullable=False),
        sa.Column("started_at", TIMESTAMPTZ, nullable=True),
        sa.Column("finished_at", TIMESTAMPTZ, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("prompts_pkey")),
        sa.CheckConstraint("status IN ('queued', 'running', 'done', 'failed')", name=op.f("prompts_status_check")),
        sa.CheckConstraint("(messages IS NULL) <> (text IS NULL)", name=op.f("prompts_messages_xor_text_check")),
    )
    op.create_index(
        op.f("prompts_queued_claim_idx"),
        "prompts",
        [sa.text("priority DESC"), "created_at", "id"],
        postgresql_where=sa.text("status = 'queued'"),
    )

    op.create_table(
        "memory_retrievals",
        sa.Column("prompt_id", sa.BigInteger(), nullable=False),
        sa.Column("memory_id", sa.BigInteger(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("score", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("prompt_id", "memory_id", name=op.f("memory_retrievals_pkey")),
        sa.ForeignKeyConstraint(
            ["prompt_id"], ["prompts.id"], name=op.f("memory_retrievals_prompt_id_fkey"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["memory_id"], ["memories.id"], name=op.f("memory_retrievals_memory_id_fkey")),
    )
    op.create_index(op.f("memory_retrievals_memory_id_idx"), "memory_retrievals", ["memory_id"])

    op.create_table(
        "icl_dynamics_log",
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("prompt_id", sa.BigInteger(), nullable=True),
        sa.Column("session_id", sa.Uuid(), nullable=True),
        sa.Column("prompt_hash", sa.Text(), nullable=True),
        sa.Column("model", sa.Text(), nullable=True),
        sa.Column("layer_idx", sa.Integer(), nullable=False),
        sa.Column("token_idx", sa.Integer(), nullable=False),
        sa.Column("token_position", sa.Integer(), nullable=True),
        sa.Column("token_text", sa.Text(), nullable=True),
        sa.Column("segment", sa.Text(), nullable=True),
        sa.Column("memory_id", sa.BigInteger(), nullable=True),
        sa.Column("delta_norm", sa.Double(), nullable=True),
        sa.Column("update_frobenius_norm", sa.Double(), nullable=True),
        sa.Column("marginal_update_norm", sa.Double(), nullable=True),
        sa.Column("cumulative_update_norm", sa.Double(), nullable=True),
        sa.Column("implicit_learning_rate", sa.Double(), nullable=True),
        sa.Column("bias_update_norm", sa.Double(), nullable=True),
        sa.Column("created_at", TIMESTAMPTZ, server_default=sa.text("now()"), nullable=False),
        postgresql_partition_by="RANGE (created_at)",
    )
    # An append-only log written by COPY: a run's rows are contiguous and run ids and times only grow,
    # so block-range indexes find a run or a time range at almost no write cost. A primary key
    # (id, created_at) with an identity column and btrees on (run_id, layer_idx, token_idx),
    # session_id and created_at held COPY to about 100,000 rows/s on a 2-core machine; this writes
    # about 250,000 (bench/bench_writer.py). Session filters go through measurement_runs and prompts.
    op.create_index(
        "icl_dynamics_log_run_id_brin",
        "icl_dynamics_log",
        ["run_id"],
        postgresql_using="brin",
        postgresql_with={"pages_per_range": BRIN_PAGES_PER_RANGE},
    )
    op.create_index("icl_dynamics_log_created_at_brin", "icl_dynamics_log", ["created_at"], postgresql_using="brin")
    # Rows outside every monthly partition land here, so an insert never fails for want of a partition;
    # icldaemon.store.partitions.ensure_partitions creates the monthly ones.
    op.execute("CREATE TABLE icl_dynamics_log_default PARTITION OF icl_dynamics_log DEFAULT")


def downgrade() -> None:
    # Dropping a partitioned table drops all of its partitions, the monthly ones included.
    op.drop_table("icl_dynamics_log")
    op.drop_table("memory_retrievals")
    op.drop_table("prompts")
    op.drop_table("memories")
