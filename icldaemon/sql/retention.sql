-- name: drop_icl_dynamics_log_partition --
-- Drop one monthly partition of the log's tables, its rows with it, through the schema owner's function (revision 0008), which refuses a month younger than the retention.
SELECT icl_drop_log_partition(%(partition)s, %(retention_days)s);
