-- name: lock_icl_dynamics_log_partitions --
-- Serialise partition maintenance between daemons until the end of the transaction.
SELECT pg_advisory_xact_lock(hashtext('icl_dynamics_log_partitions'));

-- name: list_icl_dynamics_log_partitions --
-- The names of the partitions attached to the log's tables (icl_dynamics_layers, icl_dynamics_tokens), defaults included.
SELECT child.relname AS partition_name
FROM pg_inherits
JOIN pg_class AS child ON child.oid = pg_inherits.inhrelid
WHERE pg_inherits.inhparent IN ('icl_dynamics_layers'::regclass, 'icl_dynamics_tokens'::regclass)
ORDER BY child.relname;

-- name: create_icl_dynamics_log_partition_table --
-- A stand-alone table shaped like {table} ({partition}, {table}: identifiers), to be attached as a partition.
CREATE TABLE {partition} (LIKE {table} INCLUDING DEFAULTS INCLUDING STORAGE);

-- name: move_rows_from_icl_dynamics_log_default --
-- Move the rows in [range_start, range_end) of {table}'s default partition {default} into {partition}, to attach it.
WITH moved AS (
    DELETE FROM {default}
    WHERE created_at >= %(range_start)s AND created_at < %(range_end)s
    RETURNING *
)
INSERT INTO {partition}
SELECT * FROM moved;

-- name: attach_icl_dynamics_log_partition --
-- Attach {partition} to {table} for [{range_start}, {range_end}); DDL takes no bound parameters, so the bounds are literals.
ALTER TABLE {table} ATTACH PARTITION {partition}
FOR VALUES FROM ({range_start}) TO ({range_end});
