"""Consolidation where the fact is said: answer-position patches, down-projection adapters, their figures and status.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24

`memory_answer_patches` holds, per measured retrieval, the model's greedy answer with the memory in
context and the exact patch of removing the memory at each answer position, in the down projection's
space (docs/method.md §7): the MLP input without the memory `a_tilde` (the key is computed from it)
and the layer-output change `value`, float16 little-endian [num_layers, positions, d_model] each.

`adapters` gains the method that produced a version ('down_projection'; versions before this revision
are 'gate_up_bias'), its status ('accepted' or 'rejected' by the quality gate, with the reason; earlier
versions are 'accepted') and the figures measured like model edits: answer level (with the memory,
without it, with the adapter), the answer tokens' KL, specificity on a shipped neutral set, leak, the
next-token KL share and the fit's seconds.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMPTZ = sa.DateTime(timezone=True)
FIGURES = (
    ("answer_examples", sa.Integer()),
    ("with_memory_rate", sa.Double()),
    ("without_memory_rate", sa.Double()),
    ("adapter_rate", sa.Double()),
    ("answer_kl_without", sa.Double()),
    ("answer_kl_adapter", sa.Double()),
    ("neutral_prompts", sa.Integer()),
    ("neutral_kl", sa.Double()),
    ("neutral_next_token_unchanged", sa.Double()),
    ("neutral_continuation_unchanged", sa.Double()),
    ("leak_examples", sa.Integer()),
    ("leak_rate", sa.Double()),
    ("next_token_kl_share", sa.Double()),
    ("preservation", sa.Double()),
    ("fit_seconds", sa.Double()),
)


def upgrade() -> None:
    op.create_table(
        "memory_answer_patches",
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("memory_id", sa.BigInteger(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("model_revision", sa.Text(), nullable=True),
        sa.Column("num_layers", sa.Integer(), nullable=False),
        sa.Column("d_model", sa.Integer(), nullable=False),
        sa.Column("answer_ids", postgresql.ARRAY(sa.Integer()), nullable=False),
        sa.Column("a_tilde", sa.LargeBinary(), nullable=False),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.Column("max_abs_log_prob_error", sa.Double(), nullable=True),
        sa.Column("created_at", TIMESTAMPTZ, server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "memory_id", name=op.f("memory_answer_patches_pkey")),
        sa.ForeignKeyConstraint(["run_id"], ["measurement_runs.id"], name=op.f("memory_answer_patches_run_id_fkey"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["memory_id"], ["memories.id"], name=op.f("memory_answer_patches_memory_id_fkey")),
    )
    op.create_index(op.f("memory_answer_patches_memory_id_idx"), "memory_answer_patches", ["memory_id"])

    op.add_column("adapters", sa.Column("method", sa.Text(), nullable=True))
    op.add_column("adapters", sa.Column("status", sa.Text(), nullable=True))
    op.add_column("adapters", sa.Column("status_reason", sa.Text(), nullable=True))
    for name, column_type in FIGURES:
        op.add_column("adapters", sa.Column(name, column_type, nullable=True))
    op.execute("UPDATE adapters SET method = 'gate_up_bias', status = 'accepted'")
    op.alter_column("adapters", "method", nullable=False)
    op.alter_column("adapters", "status", nullable=False)
    op.create_check_constraint("status", "adapters", "status IN ('accepted', 'rejected')")


def downgrade() -> None:
    op.drop_constraint("status", "adapters", type_="check")
    for name, _ in reversed(FIGURES):
        op.drop_column("adapters", name)
    op.drop_column("adapters", "status_reason")
    op.drop_column("adapters", "status")
    op.drop_column("adapters", "method")
    op.drop_index(op.f("memory_answer_patches_memory_id_idx"), table_name="memory_answer_patches")
    op.drop_table("memory_answer_patches")
