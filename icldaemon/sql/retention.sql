-- name: drop_icl_dynamics_log_partition --
-- Drop one monthly partition of the log's tables, its rows with it ({partition}: an identifier).
DROP TABLE {partition};
