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

-- name: grant_writer_schema --
-- The writer uses public, and creates tables there only for the monthly partitions of the log's tables.
GRANT USAGE, CREATE ON SCHEMA public TO {writer};

-- name: grant_writer_tables --
-- The writer reads and writes rows in every table; it deletes none (the log's partitions it owns).
GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {writer};

-- name: revoke_writer_schema_version --
-- The writer reads the schema revision (a daemon checks it is at head) but never changes it.
REVOKE INSERT, UPDATE ON alembic_version FROM {writer};

-- name: grant_writer_future_tables --
-- Tables that later migrations (run by this role) create are the writer's to read and write too.
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE ON TABLES TO {writer};

-- name: grant_reader_schemas --
-- The reader sees the tables and the analytics views.
GRANT USAGE ON SCHEMA public, icl_analytics TO {reader};

-- name: grant_reader_tables --
-- The reader reads every table and view, and nothing else.
GRANT SELECT ON ALL TABLES IN SCHEMA public, icl_analytics TO {reader};

-- name: grant_reader_future_objects --
-- Tables, views and schemas that later migrations (run by this role) create are readable too.
ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO {reader};

-- name: grant_reader_future_schemas --
-- Schemas that later migrations (run by this role) create are usable by the reader.
ALTER DEFAULT PRIVILEGES GRANT USAGE ON SCHEMAS TO {reader};

-- name: icl_dynamics_log_tables --
-- The log's tables (icl_dynamics_layers, icl_dynamics_tokens) and their partitions, with schema and owner: the writer must own them to add and drop partitions.
SELECT pg_namespace.nspname AS schema_name, pg_class.relname AS table_name, pg_get_userbyid(pg_class.relowner) AS owner
FROM unnest(ARRAY['icl_dynamics_layers', 'icl_dynamics_tokens']::regclass[]) AS log_table(relid)
CROSS JOIN LATERAL pg_partition_tree(log_table.relid) AS tree
JOIN pg_class ON pg_class.oid = tree.relid
JOIN pg_namespace ON pg_namespace.oid = pg_class.relnamespace
ORDER BY tree.level, pg_class.relname;

-- name: give_table_to_writer --
-- Make {writer} the owner of {table}.
ALTER TABLE {table} OWNER TO {writer};
