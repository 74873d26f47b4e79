-- name: limit_lock_waits --
-- Any login can take the maintenance's advisory lock or a lock on the log: wait for none longer than this, in this transaction.
SELECT set_config('lock_timeout', %(lock_timeout)s, true);

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

-- name: create_icl_dynamics_log_partition --
-- The monthly partition of %(table)s for the UTC month starting at %(month)s, through the schema owner's function (revision 0008); its name, or NULL when it exists.
SELECT icl_create_log_partition(%(table)s, %(month)s);
