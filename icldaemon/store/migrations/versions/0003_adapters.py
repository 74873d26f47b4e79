"""Consolidation: adapters (PEFT LoRA versions with their fidelity), adapter_patches, model_revision on patches.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMPTZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("memory_patches", sa.Column("model_revision", sa.Text(), nullable=True))

    op.create_table(
        "adapters",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("scope_key", sa.Text(), nullable=False),
        sa.Column("memory_id", sa.BigInteger(), nullable=True),
        sa.Column("session_id", sa.Uuid(), nullable=True),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("model_revision", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("layers", postgresql.ARRAY(sa.Integer()), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("ridge", sa.Double(), nullable=False),
        sa.Column("patch_count", sa.Integer(), nullable=False),
        sa.Column("held_out_count", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("kl_without", sa.Double(), nullable=True),
        sa.Column("kl_adapter_query", sa.Double(), nullable=True),
        sa.Column("kl_adapter_all", sa.Double(), nullable=True),
        sa.Column("recovered_query", sa.Double(), nullable=True),
        sa.Column("recovered_all", sa.Double(), nullable=True),
        sa.Column("greedy_match_query", sa.Double(), nullable=True),
        sa.Column("greedy_match_all", sa.Double(), nullable=True),
        sa.Column("created_at", TIMESTAMPTZ, server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("adapters_pkey")),
        sa.CheckConstraint("scope IN ('memory', 'session', 'all')", name=op.f("adapters_scope_check")),
        sa.UniqueConstraint("model", "scope_key", "version", name=op.f("adapters_model_scope_key_version_key")),
        sa.ForeignKeyConstraint(
            ["memory_id"], ["memories.id"], name=op.f("adapters_memory_id_fkey"), ondelete="SET NULL"
        ),
    )

    op.create_table(
        "adapter_patches",
        sa.Column("adapter_id", sa.BigInteger(), nullable=False),
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("memory_id", sa.BigInteger(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("adapter_id", "run_id", "memory_id", name=op.f("adapter_patches_pkey")),
        sa.CheckConstraint("role IN ('fit', 'held_out')", name=op.f("adapter_patches_role_check")),
        sa.ForeignKeyConstraint(
            ["adapter_id"], ["adapters.id"], name=op.f("adapter_patches_adapter_id_fkey"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["run_id", "memory_id"], ["memory_patches.run_id", "memory_patches.memory_id"],
            name=op.f("adapter_patches_run_id_fkey"), ondelete="CASCADE",
        ),
    )
    op.create_index(op.f("adapter_patches_run_id_memory_id_idx"), "adapter_patches", ["run_id", "memory_id"])


def downgrade() -> None:
    op.drop_table("adapter_patches")
    op.drop_table("adapters")
    op.drop_column("memory_patches", "model_revision")
