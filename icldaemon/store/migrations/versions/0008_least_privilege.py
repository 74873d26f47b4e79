"""Least privilege: partition maintenance and retention through functions, and who submitted a prompt.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03

The writer used to own the log's tables and hold CREATE on schema public, because PostgreSQL lets only
an owner attach and drop partitions: it could create any object and drop or truncate the whole log.
Two functions owned by the role that runs the migrations (the schema owner), SECURITY DEFINER with a
fixed search_path, now do the only DDL the service needs, each checking what it is asked:

- `icl_create_log_partition(log_table, month)`: the monthly partition of icl_dynamics_layers or
  icl_dynamics_tokens for the UTC month that starts at `month` (nothing else is accepted), named
  `<table>_yYYYYmMM`; rows of that month waiting in the default partition move into it. Returns the
  name, or NULL when it exists.
- `icl_drop_log_partition(partition, retention_days)`: drops one monthly partition of those two tables
  whose month ended at least `retention_days` (more than 0) before now; anything else is refused.
  Returns whether it dropped it.

EXECUTE on them is revoked from PUBLIC; `icldaemon roles` grants it to the writer, takes back the log
tables an earlier version gave the writer, and revokes its CREATE.

`prompts.submitted_by` (the session user that inserted the prompt, NULL for earlier rows) and the view
`icl_own_prompts` (the status of the prompts the current session user submitted) let a submitter role
follow its own prompts without reading anyone else's.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CREATE_PARTITION = r"""
CREATE FUNCTION icl_create_log_partition(log_table text, month timestamptz) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    month_start timestamptz;
    target text;
BEGIN
    IF log_table NOT IN ('icl_dynamics_layers', 'icl_dynamics_tokens') THEN
        RAISE EXCEPTION 'icl_create_log_partition: % is not one of the log''s tables', log_table
            USING ERRCODE = '42501';
    END IF;
    month_start := date_trunc('month', month AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    IF month IS NULL OR month <> month_start THEN
        RAISE EXCEPTION 'icl_create_log_partition: % is not the start of a month in UTC', month
            USING ERRCODE = '22023';
    END IF;
    target := log_table || to_char(month AT TIME ZONE 'UTC', '"_y"YYYY"m"MM');
    PERFORM pg_advisory_xact_lock(hashtext('icl_dynamics_log_partitions'));
    IF EXISTS (SELECT 1 FROM pg_inherits JOIN pg_class ON pg_class.oid = pg_inherits.inhrelid
               WHERE pg_inherits.inhparent = log_table::regclass AND pg_class.relname = target) THEN
        RETURN NULL;
    END IF;
    EXECUTE format('CREATE TABLE public.%I (LIKE public.%I INCLUDING DEFAULTS INCLUDING STORAGE)',
                   target, log_table);
    EXECUTE format('WITH moved AS (DELETE FROM public.%I WHERE created_at >= $1 AND created_at < $2 RETURNING *) '
                   'INSERT INTO public.%I SELECT * FROM moved', log_table || '_default', target)
        USING month_start, month_start + interval '1 month';
    EXECUTE format('ALTER TABLE public.%I ATTACH PARTITION public.%I FOR VALUES FROM (%L) TO (%L)',
                   log_table, target, month_start, month_start + interval '1 month');
    RETURN target;
END
$$
"""

DROP_PARTITION = r"""
CREATE FUNCTION icl_drop_log_partition(partition_name text, retention_days double precision) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    parts text[];
    month_end timestamptz;
BEGIN
    IF retention_days IS NULL OR NOT retention_days > 0 THEN
        RAISE EXCEPTION 'icl_drop_log_partition: the retention must be a positive number of days, got %',
            retention_days USING ERRCODE = '22023';
    END IF;
    parts := regexp_match(partition_name, '^(icl_dynamics_layers|icl_dynamics_tokens)_y(\d{4})m(\d{2})$');
    IF parts IS NULL THEN
        RAISE EXCEPTION 'icl_drop_log_partition: % is not a monthly partition of the log', partition_name
            USING ERRCODE = '42501';
    END IF;
    month_end := make_timestamptz(parts[2]::int, parts[3]::int, 1, 0, 0, 0, 'UTC') + interval '1 month';
    IF month_end > now() - retention_days * interval '1 day' THEN
        RAISE EXCEPTION 'icl_drop_log_partition: % holds rows younger than % days', partition_name, retention_days
            USING ERRCODE = '42501';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('icl_dynamics_log_partitions'));
    IF NOT EXISTS (SELECT 1 FROM pg_inherits JOIN pg_class ON pg_class.oid = pg_inherits.inhrelid
                   WHERE pg_inherits.inhparent = parts[1]::regclass AND pg_class.relname = partition_name) THEN
        RETURN false;
    END IF;
    EXECUTE format('DROP TABLE public.%I', partition_name);
    RETURN true;
END
$$
"""

OWN_PROMPTS = """
CREATE VIEW icl_own_prompts AS
SELECT id, session_id, status, attempts, last_error, created_at, started_at, finished_at
FROM prompts
WHERE submitted_by = session_user
"""

FUNCTIONS = ("icl_create_log_partition(text, timestamptz)", "icl_drop_log_partition(text, double precision)")


def upgrade() -> None:
    op.execute(CREATE_PARTITION)
    op.execute(DROP_PARTITION)
    for function in FUNCTIONS:
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")
    op.add_column("prompts", sa.Column("submitted_by", sa.Text(), server_default=sa.text("session_user"),
                                       nullable=True))
    op.execute(OWN_PROMPTS)
    op.execute("COMMENT ON VIEW icl_own_prompts IS 'The status of the prompts the current session user submitted.'")


def downgrade() -> None:
    op.execute("DROP VIEW icl_own_prompts")
    op.drop_column("prompts", "submitted_by")
    for function in FUNCTIONS:
        op.execute(f"DROP FUNCTION {function}")
