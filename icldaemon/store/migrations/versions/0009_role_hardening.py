"""Least privilege that holds against the project's own roles: the owner's settings, pinned search paths,
ownership of memories and retrievals, and bounds enforced by the database.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-08

- `icl_config` (one row, written by the schema owner only, readable by everyone): the log's retention
  and the bounds on what a client may insert (bytes of text and content, messages, retrievals per prompt,
  the priority range), and whether a prompt may retrieve another submitter's memories.
- The partition functions are SECURITY DEFINER with `search_path = pg_catalog, public, pg_temp`: with
  `pg_temp` left out of a path PostgreSQL searches it *first* for types and relations, so a caller's
  temporary domain ran as the owner. Every reference in them is schema-qualified, and they wait at most
  `lock_timeout` for a lock another role holds. `icl_drop_log_partition(partition)` reads the retention
  from `icl_config` instead of taking it from its caller, and refuses the current and later months.
  `icl_create_log_partition` refuses months past the next 12 and before the year 2000 (a partition
  whose name the retention cannot read would never be dropped); a new partition has no grants:
  every role reads and writes the log through its parent table, where the column grants apply.
- `memories.submitted_by` (earlier rows: the schema owner's). A retrieval may join a prompt only when
  the session user submitted that prompt (or owns the schema), only a memory of the prompt's submitter
  (unless `icl_config.share_memories`), with a rank of 1 or more and a finite score, and no more than
  `max_retrievals` per prompt. `icl_put_memory(key, content)` stores or replaces the caller's own memory
  under a key, so that a submitter can keep its memories without UPDATE on the table.
- `icl_own_prompts` is a security barrier: a function in a caller's WHERE clause runs only on the rows
  the view shows. EXECUTE on `icl_submit` is revoked from PUBLIC (`icldaemon roles` grants it).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SAFE_PATH = "pg_catalog, public, pg_temp"
LOCK_TIMEOUT = "10s"  # the longest partition maintenance waits for a lock another role holds

CREATE_PARTITION = rf"""
CREATE FUNCTION public.icl_create_log_partition(log_table text, month timestamptz) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = {SAFE_PATH} SET lock_timeout = '{LOCK_TIMEOUT}' AS $$
DECLARE
    month_start timestamptz;
    target text;
    parent regclass;
    grantee oid;
BEGIN
    IF log_table IS NULL OR log_table NOT IN ('icl_dynamics_layers', 'icl_dynamics_tokens') THEN
        RAISE EXCEPTION 'icl_create_log_partition: % is not one of the log''s tables', log_table
            USING ERRCODE = '42501';
    END IF;
    month_start := date_trunc('month', month AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    IF month IS NULL OR month <> month_start THEN
        RAISE EXCEPTION 'icl_create_log_partition: % is not the start of a month in UTC', month
            USING ERRCODE = '22023';
    END IF;
    IF month_start < timestamptz '2000-01-01 00:00:00+00'
       OR month_start > date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' + interval '12 months' THEN
        RAISE EXCEPTION 'icl_create_log_partition: % lies outside the months a partition may be made for '
            '(from 2000 to 12 months after the current one)', month USING ERRCODE = '22023';
    END IF;
    parent := ('public.' || log_table)::regclass;
    target := log_table || to_char(month AT TIME ZONE 'UTC', '"_y"YYYY"m"MM');
    PERFORM pg_advisory_xact_lock(hashtext('icl_dynamics_log_partitions'));
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_inherits JOIN pg_catalog.pg_class ON pg_class.oid = pg_inherits.inhrelid
               WHERE pg_inherits.inhparent = parent AND pg_class.relname = target) THEN
        RETURN NULL;
    END IF;
    EXECUTE format('CREATE TABLE public.%I (LIKE public.%I INCLUDING DEFAULTS INCLUDING STORAGE)',
                   target, log_table);
    -- default privileges may have granted the new table to other roles: they read it through its parent
    EXECUTE format('REVOKE ALL ON public.%I FROM PUBLIC', target);
    FOR grantee IN SELECT DISTINCT acl.grantee FROM pg_catalog.pg_class,
                   LATERAL pg_catalog.aclexplode(pg_class.relacl) AS acl
                   WHERE pg_class.oid = ('public.' || target)::regclass AND acl.grantee <> pg_class.relowner
                     AND acl.grantee <> 0 LOOP
        EXECUTE format('REVOKE ALL ON public.%I FROM %I', target, pg_catalog.pg_get_userbyid(grantee));
    END LOOP;
    EXECUTE format('WITH moved AS (DELETE FROM public.%I WHERE created_at >= $1 AND created_at < $2 RETURNING *) '
                   'INSERT INTO public.%I SELECT * FROM moved', log_table || '_default', target)
        USING month_start, month_start + interval '1 month';
    EXECUTE format('ALTER TABLE public.%I ATTACH PARTITION public.%I FOR VALUES FROM (%L) TO (%L)',
                   log_table, target, month_start, month_start + interval '1 month');
    RETURN target;
END
$$
"""

DROP_PARTITION = rf"""
CREATE FUNCTION public.icl_drop_log_partition(partition_name text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = {SAFE_PATH} SET lock_timeout = '{LOCK_TIMEOUT}' AS $$
DECLARE
    parts text[];
    month_end timestamptz;
    retention double precision;
BEGIN
    SELECT icl_config.retention_days INTO retention FROM public.icl_config;
    IF retention IS NULL THEN
        RAISE EXCEPTION 'icl_drop_log_partition: no retention is configured (icl_config.retention_days, set by '
            'the schema owner with icldaemon roles --retention-days): nothing is dropped' USING ERRCODE = '42501';
    END IF;
    parts := regexp_match(partition_name, '^(icl_dynamics_layers|icl_dynamics_tokens)_y(\d{{4}})m(\d{{2}})$');
    IF parts IS NULL THEN
        RAISE EXCEPTION 'icl_drop_log_partition: % is not a monthly partition of the log', partition_name
            USING ERRCODE = '42501';
    END IF;
    month_end := make_timestamptz(parts[2]::int, parts[3]::int, 1, 0, 0, 0, 'UTC') + interval '1 month';
    IF month_end > now() - retention * interval '1 day' OR month_end > now() THEN
        RAISE EXCEPTION 'icl_drop_log_partition: % holds rows younger than the configured retention of % days',
            partition_name, retention USING ERRCODE = '42501';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('icl_dynamics_log_partitions'));
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits JOIN pg_catalog.pg_class ON pg_class.oid = pg_inherits.inhrelid
                   WHERE pg_inherits.inhparent = ('public.' || parts[1])::regclass
                     AND pg_class.relname = partition_name) THEN
        RETURN false;
    END IF;
    EXECUTE format('DROP TABLE public.%I', partition_name);
    RETURN true;
END
$$
"""

# Invoker triggers: they read icl_config (readable by everyone) and the row being written.
PROMPT_BOUNDS = rf"""
CREATE FUNCTION public.icl_check_prompt_bounds() RETURNS trigger
LANGUAGE plpgsql SET search_path = {SAFE_PATH} AS $$
DECLARE
    config public.icl_config;
    text_bytes bigint;
BEGIN
    SELECT * INTO config FROM public.icl_config;
    IF NEW.messages IS NOT NULL AND jsonb_typeof(NEW.messages) = 'array'
       AND jsonb_array_length(NEW.messages) > config.max_messages THEN
        RAISE EXCEPTION 'prompt has % messages; the limit is % (icl_config.max_messages)',
            jsonb_array_length(NEW.messages), config.max_messages USING ERRCODE = '22023';
    END IF;
    text_bytes := coalesce(octet_length(NEW.text), octet_length(NEW.messages::text), 0);
    IF text_bytes > config.max_text_bytes THEN
        RAISE EXCEPTION 'prompt text is % bytes; the limit is % (icl_config.max_text_bytes)',
            text_bytes, config.max_text_bytes USING ERRCODE = '22023';
    END IF;
    IF NEW.priority < config.min_priority OR NEW.priority > config.max_priority THEN
        RAISE EXCEPTION 'priority % is outside the allowed range % to % (icl_config.min_priority, max_priority)',
            NEW.priority, config.min_priority, config.max_priority USING ERRCODE = '22023';
    END IF;
    RETURN NEW;
END
$$
"""

MEMORY_BOUNDS = rf"""
CREATE FUNCTION public.icl_check_memory_bounds() RETURNS trigger
LANGUAGE plpgsql SET search_path = {SAFE_PATH} AS $$
DECLARE
    config public.icl_config;
BEGIN
    SELECT * INTO config FROM public.icl_config;
    IF octet_length(NEW.content) > config.max_content_bytes THEN
        RAISE EXCEPTION 'memory content is % bytes; the limit is % (icl_config.max_content_bytes)',
            octet_length(NEW.content), config.max_content_bytes USING ERRCODE = '22023';
    END IF;
    IF octet_length(NEW.key) > config.max_key_bytes THEN
        RAISE EXCEPTION 'memory key is % bytes; the limit is % (icl_config.max_key_bytes)',
            octet_length(NEW.key), config.max_key_bytes USING ERRCODE = '22023';
    END IF;
    RETURN NEW;
END
$$
"""

# SECURITY DEFINER: it reads who submitted the prompt and the memory, which a submitter may not read.
CHECK_RETRIEVAL = rf"""
CREATE FUNCTION public.icl_check_retrieval() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = {SAFE_PATH} AS $$
DECLARE
    config public.icl_config;
    prompt_owner text;
    memory_owner text;
    held integer;
BEGIN
    SELECT * INTO config FROM public.icl_config;
    -- the prompt's row lock serialises the count of its retrievals
    SELECT prompts.submitted_by INTO prompt_owner FROM public.prompts WHERE prompts.id = NEW.prompt_id
        FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN NEW;  -- the foreign key reports it
    END IF;
    IF prompt_owner IS DISTINCT FROM session_user AND NOT public.icl_is_schema_owner() THEN
        RAISE EXCEPTION 'retrieval refused: prompt % was not submitted by %', NEW.prompt_id, session_user
            USING ERRCODE = '42501';
    END IF;
    SELECT memories.submitted_by INTO memory_owner FROM public.memories WHERE memories.id = NEW.memory_id;
    IF FOUND AND memory_owner IS DISTINCT FROM prompt_owner AND NOT config.share_memories THEN
        RAISE EXCEPTION 'retrieval refused: memory % belongs to another submitter than prompt % '
            '(icl_config.share_memories is off)', NEW.memory_id, NEW.prompt_id USING ERRCODE = '42501';
    END IF;
    SELECT count(*) INTO held FROM public.memory_retrievals
    WHERE memory_retrievals.prompt_id = NEW.prompt_id AND memory_retrievals.memory_id <> NEW.memory_id;
    IF held >= config.max_retrievals THEN
        RAISE EXCEPTION 'prompt % already has % retrievals; the limit is % (icl_config.max_retrievals)',
            NEW.prompt_id, held, config.max_retrievals USING ERRCODE = '22023';
    END IF;
    RETURN NEW;
END
$$
"""

IS_SCHEMA_OWNER = rf"""
CREATE FUNCTION public.icl_is_schema_owner() RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = {SAFE_PATH} AS $$
    SELECT pg_catalog.pg_has_role(session_user, pg_class.relowner, 'MEMBER')
    FROM pg_catalog.pg_class WHERE pg_class.oid = 'public.icl_config'::regclass
$$
"""

PUT_MEMORY = rf"""
CREATE FUNCTION public.icl_put_memory(key text, content text, OUT memory_id bigint, OUT outcome text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = {SAFE_PATH} AS $$
DECLARE
    stored text;
BEGIN
    IF key IS NULL OR content IS NULL THEN
        RAISE EXCEPTION 'icl_put_memory: a memory needs a key and a content' USING ERRCODE = '22023';
    END IF;
    -- one key of one submitter at a time: memories.key is not unique
    PERFORM pg_advisory_xact_lock(hashtextextended('icldaemon memory ' || session_user || ' ' || key, 0));
    SELECT memories.id, memories.content INTO memory_id, stored FROM public.memories
    WHERE memories.key = icl_put_memory.key AND memories.submitted_by = session_user
    ORDER BY memories.id LIMIT 1 FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO public.memories (key, content, submitted_by)
        VALUES (icl_put_memory.key, icl_put_memory.content, session_user) RETURNING memories.id INTO memory_id;
        outcome := 'added';
    ELSIF stored = content THEN
        outcome := 'unchanged';
    ELSE
        UPDATE public.memories SET content = icl_put_memory.content WHERE memories.id = memory_id;
        outcome := 'updated';
    END IF;
END
$$
"""

DEFINER_FUNCTIONS = ("icl_create_log_partition(text, timestamptz)", "icl_drop_log_partition(text)",
                     "icl_check_retrieval()", "icl_is_schema_owner()", "icl_put_memory(text, text)")
INVOKER_FUNCTIONS = ("icl_check_prompt_bounds()", "icl_check_memory_bounds()")
TRIGGERS = (
    ("prompts_bounds", "prompts", "BEFORE INSERT OR UPDATE OF text, messages, priority", "icl_check_prompt_bounds"),
    ("memories_bounds", "memories", "BEFORE INSERT OR UPDATE OF key, content", "icl_check_memory_bounds"),
    ("memory_retrievals_owner", "memory_retrievals", "BEFORE INSERT OR UPDATE", "icl_check_retrieval"),
)

# Rights that default privileges or earlier grants gave on icl_config to anyone but its owner: only SELECT stays.
CONFIG_OWNER_ONLY = """
DO $$
DECLARE
    grantee oid;
BEGIN
    FOR grantee IN SELECT DISTINCT acl.grantee FROM pg_catalog.pg_class,
                   LATERAL pg_catalog.aclexplode(pg_class.relacl) AS acl
                   WHERE pg_class.oid = 'public.icl_config'::regclass AND acl.grantee NOT IN (0, pg_class.relowner) LOOP
        EXECUTE format('REVOKE INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON public.icl_config FROM %I',
                       pg_catalog.pg_get_userbyid(grantee));
    END LOOP;
END
$$
"""

OLD_DROP_PARTITION_SIGNATURE = "icl_drop_log_partition(text, double precision)"


def upgrade() -> None:
    op.create_table(
        "icl_config",
        sa.Column("id", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("retention_days", sa.Double(), nullable=True),
        sa.Column("max_text_bytes", sa.Integer(), server_default=sa.text("1048576"), nullable=False),
        sa.Column("max_messages", sa.Integer(), server_default=sa.text("256"), nullable=False),
        sa.Column("max_content_bytes", sa.Integer(), server_default=sa.text("65536"), nullable=False),
        sa.Column("max_key_bytes", sa.Integer(), server_default=sa.text("1024"), nullable=False),
        sa.Column("max_retrievals", sa.Integer(), server_default=sa.text("64"), nullable=False),
        sa.Column("min_priority", sa.Integer(), server_default=sa.text("-1000"), nullable=False),
        sa.Column("max_priority", sa.Integer(), server_default=sa.text("1000"), nullable=False),
        sa.Column("share_memories", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.CheckConstraint("id", name=op.f("icl_config_one_row_check")),
        sa.CheckConstraint("retention_days > 0 AND retention_days < 'Infinity'", name=op.f("icl_config_retention_check")),
        sa.CheckConstraint("max_text_bytes > 0 AND max_messages > 0 AND max_content_bytes > 0 AND max_key_bytes > 0 "
                           "AND max_retrievals >= 0", name=op.f("icl_config_bounds_check")),
        sa.CheckConstraint("min_priority <= max_priority", name=op.f("icl_config_priority_range_check")),
        sa.PrimaryKeyConstraint("id", name=op.f("icl_config_pkey")),
    )
    op.execute("INSERT INTO icl_config DEFAULT VALUES")
    op.execute("REVOKE ALL ON icl_config FROM PUBLIC")
    op.execute(CONFIG_OWNER_ONLY)
    op.execute("GRANT SELECT ON icl_config TO PUBLIC")
    op.execute("COMMENT ON TABLE icl_config IS 'The schema owner''s settings: the log''s retention and the bounds on "
               "what clients insert. One row.'")

    op.add_column("memories", sa.Column("submitted_by", sa.Text(), server_default=sa.text("session_user"),
                                        nullable=True))
    op.execute("UPDATE memories SET submitted_by = current_user")
    op.create_check_constraint(op.f("memory_retrievals_rank_check"), "memory_retrievals", "rank >= 1")
    op.create_check_constraint(op.f("memory_retrievals_score_check"), "memory_retrievals",
                               "score > '-Infinity' AND score < 'Infinity'")

    op.execute(f"DROP FUNCTION {OLD_DROP_PARTITION_SIGNATURE}")
    op.execute("DROP FUNCTION icl_create_log_partition(text, timestamptz)")
    for body in (CREATE_PARTITION, DROP_PARTITION, IS_SCHEMA_OWNER, CHECK_RETRIEVAL, PUT_MEMORY, PROMPT_BOUNDS,
                 MEMORY_BOUNDS):
        op.execute(body)
    for function in (*DEFINER_FUNCTIONS, *INVOKER_FUNCTIONS):
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")
    op.execute("GRANT EXECUTE ON FUNCTION icl_is_schema_owner() TO PUBLIC")
    for name, table, when, function in TRIGGERS:
        op.execute(f"CREATE TRIGGER {name} {when} ON {table} FOR EACH ROW EXECUTE FUNCTION {function}()")
    op.execute("REVOKE ALL ON FUNCTION icl_submit(jsonb, bigint[], text, uuid, integer) FROM PUBLIC")
    op.execute("ALTER VIEW icl_own_prompts SET (security_barrier = true)")


def downgrade() -> None:
    op.execute("ALTER VIEW icl_own_prompts RESET (security_barrier)")
    op.execute("GRANT EXECUTE ON FUNCTION icl_submit(jsonb, bigint[], text, uuid, integer) TO PUBLIC")
    for name, table, _when, _function in TRIGGERS:
        op.execute(f"DROP TRIGGER {name} ON {table}")
    for function in (*INVOKER_FUNCTIONS, *DEFINER_FUNCTIONS):
        op.execute(f"DROP FUNCTION {function}")
    # revision 0008's functions, as they were
    migration_0008 = _revision_0008()
    op.execute(migration_0008.CREATE_PARTITION)
    op.execute(migration_0008.DROP_PARTITION)
    for function in migration_0008.FUNCTIONS:
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")
    op.drop_constraint(op.f("memory_retrievals_score_check"), "memory_retrievals")
    op.drop_constraint(op.f("memory_retrievals_rank_check"), "memory_retrievals")
    op.drop_column("memories", "submitted_by")
    op.drop_table("icl_config")


def _revision_0008():
    import importlib

    return importlib.import_module("icldaemon.store.migrations.versions.0008_least_privilege")
