-- name: lock_icl_dynamics_log_partitions --
-- Serialise partition maintenance between daemons until the end of the transaction.
SELECT pg_advisory_xact_lock(hashtext('icl_dynamics_log_partitions'));

-- name: list_icl_dynamics_log_partitions --
-- The names of the partitions attached to icl_dynamics_log, the default partition included.
SELECT child.relname AS partition_name
FROM pg_inherits
JOIN pg_class AS child ON child.oid = pg_inherits.inhrelid
WHERE pg_inherits.inhparent = 'icl_dynamics_log'::regclass
ORDER BY child.relname;

-- name: create_icl_dynamics_log_partition_table --
-- A stand-alone table shaped like icl_dynamics_log ({partition}: an identifier), to be attached as a partition.
CREATE TABLE {partition} (LIKE icl_dynamics_log INCLUDING DEFAULTS);

-- name: move_rows_from_icl_dynamics_log_default --
-- Move the default partition's rows in [range_start, range_end) into {partition}, so that it can be attached.
WITH moved AS (
    DELETE FROM icl_dynamics_log_default
    WHERE created_at >= %(range_start)s AND created_at < %(range_end)s
    RETURNING *
)
INSERT INTO {partition}
SELECT * FROM moved;

-- name: attach_icl_dynamics_log_partition --
-- Attach {partition} for [{range_start}, {range_end}); DDL takes no bound parameters, so the bounds are literals.
ALTER TABLE icl_dynamics_log ATTACH PARTITION {partition}
FOR VALUES FROM ({range_start}) TO ({range_end});
