-- name: drop_icl_dynamics_log_partition --
-- Drop one monthly partition of the log's tables, its rows with it, through the schema owner's function (revision 0009), which refuses a month younger than the retention the owner configured.
SELECT icl_drop_log_partition(%(partition)s);

-- name: configured_retention --
-- The retention the schema owner configured (NULL: keep the log), and whether the session user owns the schema.
SELECT retention_days, icl_is_schema_owner() FROM icl_config;

-- name: set_retention --
-- The log's retention in days after a month ends (NULL: keep the log): `icldaemon roles --retention-days`, or the daemon's ICLD_RETENTION_DAYS when it runs as the schema owner; only the owner may write icl_config.
UPDATE icl_config SET retention_days = %(retention_days)s;
