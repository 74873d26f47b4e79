-- Is the measurement still exact? Every run checks that the model without its context, with the
-- measured patch applied, reproduces the model with the context: the largest logit difference and
-- the KL between the two. In float32 on the bundled model the error is about 3e-5; a rise over time
-- (a new model, a new dtype, a new device, a regression) is a health signal. Read from the views
-- icl_analytics.exactness_hourly and icl_analytics.run_summary.
--
-- Variables (psql -v NAME=VALUE; from Python or `icldaemon query`, parameters of the same names),
-- and the whole file in psql ($URL: the database, e.g. the URL `icldaemon db` prints):
--   since  the earliest time counted, e.g. 2026-11-01 or '2026-11-01 12:00+00'
--   limit  how many rows at most
--
--   psql "$URL" -v since=2026-11-01 -v limit=10 -f sql/exactness.sql

-- name: exactness_by_day --
-- Per day, model and dtype since a time: runs, worst and 95th-percentile logit error, worst KL, and the worst memory patch check.
SELECT date_trunc('day', hour) AS day, model, dtype,
       sum(runs) AS runs,
       max(max_abs_logit_error) AS max_abs_logit_error,
       max(p95_abs_logit_error) AS worst_hourly_p95_abs_logit_error,
       max(max_exactness_kl) AS max_exactness_kl,
       max(memory_max_abs_logit_error) AS memory_max_abs_logit_error
FROM icl_analytics.exactness_hourly
WHERE hour >= date_trunc('hour', :'since'::timestamptz)
GROUP BY 1, 2, 3
ORDER BY 1, 2, 3;

-- name: least_exact_runs --
-- The runs with the largest logit error since a time, worst first: where to look when the health signal rises.
SELECT run_id, prompt_id, model, dtype, device, created_at, context_tokens, max_abs_logit_error, exactness_kl
FROM icl_analytics.run_summary
WHERE created_at >= :'since'
ORDER BY max_abs_logit_error DESC NULLS LAST, run_id
LIMIT :limit;
