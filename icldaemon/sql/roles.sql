-- name: role_exists --
-- Whether a role of this name exists in the cluster (roles are cluster-wide, not per database).
SELECT 1 FROM pg_roles WHERE rolname = %(role)s;

-- name: create_login_role --
-- A role that can log in, with no password: set one (or use peer or certificate authentication) as the site requires.
CREATE ROLE {role} LOGIN;

-- name: role_is_read_only --
-- Whether a role's sessions start read-only in every database.
SELECT 1 FROM pg_db_role_setting
WHERE setrole = (SELECT oid FROM pg_roles WHERE rolname = %(role)s) AND setdatabase = 0
  AND 'default_transaction_read_only=on' = ANY(setconfig);

-- name: make_role_read_only --
-- Every session of the role starts read-only: a second guard besides its grants.
ALTER ROLE {role} SET default_transaction_read_only = on;

-- name: grant_connect --
-- Both roles may connect to this database.
GRANT CONNECT ON DATABASE {database} TO {writer}, {reader};

-- name: create_group_role --
-- A role that cannot log in: granted to the logins that may act as it.
CREATE ROLE {role} NOLOGIN;

-- name: grant_writer_schema --
-- The writer uses public and creates nothing there (an earlier version let it create the log's partitions).
GRANT USAGE ON SCHEMA public TO {writer};
REVOKE CREATE ON SCHEMA public FROM {writer};

-- name: grant_writer_functions --
-- Partition maintenance and retention run in the schema owner's functions, which check what they are asked.
GRANT EXECUTE ON FUNCTION icl_create_log_partition(text, timestamptz), icl_drop_log_partition(text),
    icl_submit(jsonb, bigint[], text, uuid, integer), icl_put_memory(text, text) TO {writer};

-- name: grant_writer_tables --
-- The writer reads and writes rows in every table; it deletes none and owns none.
GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {writer};

-- name: revoke_writer_schema_version --
-- The writer reads the schema revision (a daemon checks it is at head) and the owner's settings (retention, bounds) but changes neither.
REVOKE INSERT, UPDATE ON alembic_version, icl_config FROM {writer};

-- name: grant_writer_future_tables --
-- Tables that later migrations (run by this role) create are the writer's to read and write too.
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE ON TABLES TO {writer};

-- name: grant_reader_schemas --
-- The reader sees the tables and the analytics views.
GRANT USAGE ON SCHEMA public, icl_analytics TO {reader};

-- name: grant_reader_tables --
-- The reader reads every table and view, and nothing else; of prompts and memories not the raw text (below).
GRANT SELECT ON ALL TABLES IN SCHEMA public, icl_analytics TO {reader};

-- name: relation_columns --
-- The columns of one table or view, in order.
SELECT attname FROM pg_attribute WHERE attrelid = %(relation)s::regclass AND attnum > 0 AND NOT attisdropped
ORDER BY attnum;

-- name: reader_without_columns --
-- The reader reads {relation} but not the columns left out of {columns} (text, or numbers that rebuild it).
REVOKE SELECT ON {relation} FROM {reader};
GRANT SELECT ({columns}) ON {relation} TO {reader};

-- name: revoke_partition --
-- Nobody but the owner reads or writes a partition of the log directly: every role goes through its parent table.
REVOKE ALL ON {partition} FROM PUBLIC, {writer}, {reader};

-- name: grant_text_reader --
-- The opt-in role that may read the raw text too: grant it to a login that needs it (GRANT {text_reader} TO someone).
GRANT USAGE ON SCHEMA public TO {text_reader};
GRANT SELECT ON {relations} TO {text_reader};

-- name: grant_submitter --
-- Applications submit prompts and memories and follow their own prompts' status, and nothing else.
GRANT CONNECT ON DATABASE {database} TO {submitter};
GRANT USAGE ON SCHEMA public TO {submitter};
GRANT EXECUTE ON FUNCTION icl_submit(jsonb, bigint[], text, uuid, integer), icl_put_memory(text, text) TO {submitter};
GRANT INSERT (session_id, messages, text, priority) ON prompts TO {submitter};
GRANT SELECT (id) ON prompts, memories TO {submitter};
GRANT INSERT (key, content, metadata) ON memories TO {submitter};
GRANT INSERT ON memory_retrievals TO {submitter};
GRANT SELECT ON icl_own_prompts TO {submitter};

-- name: grant_reader_future_objects --
-- Tables, views and schemas that later migrations (run by this role) create are readable too.
ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO {reader};

-- name: grant_reader_future_schemas --
-- Schemas that later migrations (run by this role) create are usable by the reader.
ALTER DEFAULT PRIVILEGES GRANT USAGE ON SCHEMAS TO {reader};

-- name: icl_dynamics_log_tables --
-- The log's tables (icl_dynamics_layers, icl_dynamics_tokens) and their partitions, with schema and owner: an earlier version gave them to the writer.
SELECT pg_namespace.nspname AS schema_name, pg_class.relname AS table_name, pg_get_userbyid(pg_class.relowner) AS owner,
       tree.level
FROM unnest(ARRAY['icl_dynamics_layers', 'icl_dynamics_tokens']::regclass[]) AS log_table(relid)
CROSS JOIN LATERAL pg_partition_tree(log_table.relid) AS tree
JOIN pg_class ON pg_class.oid = tree.relid
JOIN pg_namespace ON pg_namespace.oid = pg_class.relnamespace
ORDER BY tree.level, pg_class.relname;

-- name: schema_owner --
-- The role that ran the migrations: it owns alembic_version, the tables and the functions.
SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'alembic_version'::regclass;

-- name: give_table_back --
-- Make {owner} the owner of {table} again.
ALTER TABLE {table} OWNER TO {owner};

-- name: revoke_temporary --
-- No role of this database makes temporary objects unless granted: nothing the service does needs them, and a temporary object is how a caller shadows names.
REVOKE TEMPORARY ON DATABASE {database} FROM PUBLIC;

-- name: public_create_granted --
-- Whether PUBLIC may still create objects in schema public (every database made before PostgreSQL 15 and upgraded).
SELECT has_schema_privilege('public', 'public', 'CREATE');

-- name: revoke_public_create --
-- Nobody but the schema's owner creates objects in schema public.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
