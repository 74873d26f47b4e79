"""The daemon: prompt leases, measurement results, memory patches, icl_submit() and the icl_prompts notification.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMPTZ = sa.DateTime(timezone=True)

NOTIFY_FUNCTION = """
CREATE FUNCTION icl_prompts_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Delivered at commit: a daemon that wakes finds the prompt (and its retrievals) committed.
    PERFORM pg_notify('icl_prompts', NEW.id::text);
    RETURN NULL;
END
$$
"""

NOTIFY_TRIGGER = """
CREATE TRIGGER prompts_notify AFTER INSERT ON prompts
FOR EACH ROW WHEN (NEW.status = 'queued') EXECUTE FUNCTION icl_prompts_notify()
"""

SUBMIT_FUNCTION = """
CREATE FUNCTION icl_submit(
    messages jsonb,
    memory_ids bigint[] DEFAULT '{}',
    text text DEFAULT NULL,
    session_id uuid DEFAULT NULL,
    priority integer DEFAULT 0
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    new_id bigint;
    missing bigint;
    repeated bigint;
BEGIN
    IF (messages IS NULL) = (text IS NULL) THEN
        RAISE EXCEPTION 'icl_submit: exactly one of messages and text must be given' USING ERRCODE = '22023';
    END IF;
    IF messages IS NOT NULL AND (jsonb_typeof(messages) <> 'array' OR jsonb_array_length(messages) = 0) THEN
        RAISE EXCEPTION 'icl_submit: messages must be a non-empty JSON array of {"role", "content"} objects'
            USING ERRCODE = '22023';
    END IF;
    IF messages IS NOT NULL AND EXISTS (
        SELECT 1 FROM jsonb_array_elements(messages) AS message
        WHERE jsonb_typeof(message) <> 'object'
           OR jsonb_typeof(message -> 'role') IS DISTINCT FROM 'string'
           OR jsonb_typeof(message -> 'content') IS DISTINCT FROM 'string'
    ) THEN
        RAISE EXCEPTION 'icl_submit: every message must be a {"role": string, "content": string} object'
            USING ERRCODE = '22023';
    END IF;
    SELECT requested.id INTO missing
    FROM unnest(coalesce(memory_ids, '{}')) AS requested(id)
    WHERE requested.id IS NULL OR NOT EXISTS (SELECT 1 FROM memories WHERE memories.id = requested.id)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'icl_submit: memory % does not exist', coalesce(missing::text, 'NULL')
            USING ERRCODE = '23503';
    END IF;
    SELECT requested.id INTO repeated
    FROM unnest(coalesce(memory_ids, '{}')) AS requested(id)
    GROUP BY requested.id HAVING count(*) > 1
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'icl_submit: memory % is named more than once', repeated USING ERRCODE = '22023';
    END IF;

    INSERT INTO prompts (messages, text, session_id, priority)
    VALUES (icl_submit.messages, icl_submit.text, icl_submit.session_id, coalesce(icl_submit.priority, 0))
    RETURNING id INTO new_id;
    INSERT INTO memory_retrievals (prompt_id, memory_id, rank)
    SELECT new_id, requested.id, requested.rank::integer
    FROM unnest(coalesce(memory_ids, '{}')) WITH ORDINALITY AS requested(id, rank);
    RETURN new_id;
END
$$
"""


def upgrade() -> None:
    op.add_column("prompts", sa.Column("lease_expires_at", TIMESTAMPTZ, nullable=True))
    op.add_column("prompts", sa.Column("worker_id", sa.Text(), nullable=True))
    op.add_column("prompts", sa.Column("next_attempt_at", TIMESTAMPTZ, nullable=True))

    op.create_table(
        "measurement_runs",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("prompt_id", sa.BigInteger(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("dtype", sa.Text(), nullable=True),
        sa.Column("device", sa.Text(), nullable=True),
        sa.Column("num_layers", sa.Integer(), nullable=False),
        sa.Column("total_tokens", sa.Integer(), nullable=False),
        sa.Column("context_tokens", sa.Integer(), nullable=False),
        sa.Column("anchor_tokens", sa.Integer(), nullable=False),
        sa.Column("query_position", sa.Integer(), nullable=False),
        sa.Column("stride", sa.Integer(), nullable=False),
        sa.Column("plain_forward_s", sa.Double(), nullable=True),
        sa.Column("measure_s", sa.Double(), nullable=True),
        sa.Column("max_abs_logit_error", sa.Double(), nullable=True),
        sa.Column("exactness_kl", sa.Double(), nullable=True),
        sa.Column("context_kl", sa.Double(), nullable=True),
        sa.Column("created_at", TIMESTAMPTZ, server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("measurement_runs_pkey")),
        sa.ForeignKeyConstraint(
            ["prompt_id"], ["prompts.id"], name=op.f("measurement_runs_prompt_id_fkey"), ondelete="CASCADE"
        ),
    )
    op.create_index(op.f("measurement_runs_prompt_id_idx"), "measurement_runs", ["prompt_id"])

    op.create_table(
        "memory_effects",
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("memory_id", sa.BigInteger(), nullable=False),
        sa.Column("segment", sa.Text(), nullable=False),
        sa.Column("token_start", sa.Integer(), nullable=False),
        sa.Column("token_end", sa.Integer(), nullable=False),
        sa.Column("kl", sa.Double(), nullable=True),
        sa.Column("max_abs_logit_error", sa.Double(), nullable=True),
        sa.Column("patched_kl", sa.Double(), nullable=True),
        sa.Column("update_frobenius_norm", postgresql.ARRAY(sa.Double()), nullable=False),
        sa.Column("bias_update_norm", postgresql.ARRAY(sa.Double()), nullable=False),
        sa.Column("created_at", TIMESTAMPTZ, server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "memory_id", name=op.f("memory_effects_pkey")),
        sa.ForeignKeyConstraint(
            ["run_id"], ["measurement_runs.id"], name=op.f("memory_effects_run_id_fkey"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["memory_id"], ["memories.id"], name=op.f("memory_effects_memory_id_fkey")),
    )
    op.create_index(op.f("memory_effects_memory_id_idx"), "memory_effects", ["memory_id"])

    op.create_table(
        "memory_patches",
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("memory_id", sa.BigInteger(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("num_layers", sa.Integer(), nullable=False),
        sa.Column("d_model", sa.Integer(), nullable=False),
        sa.Column("delta", sa.LargeBinary(), nullable=False),
        sa.Column("a_tilde", sa.LargeBinary(), nullable=False),
        sa.Column("bias_delta", sa.LargeBinary(), nullable=False),
        sa.Column("consolidated_at", TIMESTAMPTZ, nullable=True),
        sa.Column("created_at", TIMESTAMPTZ, server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "memory_id", name=op.f("memory_patches_pkey")),
        sa.ForeignKeyConstraint(
            ["run_id"], ["measurement_runs.id"], name=op.f("memory_patches_run_id_fkey"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["memory_id"], ["memories.id"], name=op.f("memory_patches_memory_id_fkey")),
    )
    op.create_index(op.f("memory_patches_memory_id_idx"), "memory_patches", ["memory_id"])

    op.execute(NOTIFY_FUNCTION)
    op.execute(NOTIFY_TRIGGER)
    op.execute(SUBMIT_FUNCTION)


def downgrade() -> None:
    op.execute("DROP FUNCTION icl_submit(jsonb, bigint[], text, uuid, integer)")
    op.execute("DROP TRIGGER prompts_notify ON prompts")
    op.execute("DROP FUNCTION icl_prompts_notify()")
    op.drop_table("memory_patches")
    op.drop_table("memory_effects")
    op.drop_table("measurement_runs")
    op.drop_column("prompts", "next_attempt_at")
    op.drop_column("prompts", "worker_id")
    op.drop_column("prompts", "lease_expires_at")
