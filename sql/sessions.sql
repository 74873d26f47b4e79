-- What happened in a session (one conversation's prompts)? Per session (view
-- icl_analytics.session_summary): prompts by status, measurement runs, context tokens, the context's
-- mean behavioural effect (KL with against without the whole context), the worst exactness error,
-- time spent measuring and how many distinct memories were retrieved; and, within one session, which
-- memories moved the model most.
--
-- Variables (psql -v NAME=VALUE; from Python or `icldaemon query`, parameters of the same names),
-- and the whole file in psql ($URL: the database, e.g. the URL `icldaemon db` prints):
--   limit       how many rows at most
--   session_id  a session's UUID, as the application submitted it
--
--   psql "$URL" -v limit=10 -v session_id=00000000-0000-0000-0000-000000000001 -f sql/sessions.sql

-- name: recent_sessions --
-- The sessions with the most recent activity, newest first, with their summaries.
SELECT session_id, prompts, done, failed, pending, runs, context_tokens, mean_context_kl, max_abs_logit_error,
       measure_s, distinct_memories, first_prompt_at, last_activity_at
FROM icl_analytics.session_summary
WHERE session_id IS NOT NULL
ORDER BY last_activity_at DESC
LIMIT :limit;

-- name: session_memories --
-- Within one session: each retrieved memory's number of runs, mean KL and mean patch norm, most behavioural effect first.
SELECT memory_id, max(memory_key) AS memory_key, count(*) AS runs, avg(kl) AS mean_kl,
       avg(total_update_norm) AS mean_total_update_norm, mode() WITHIN GROUP (ORDER BY peak_layer_idx) AS usual_peak_layer_idx
FROM icl_analytics.memory_impact
WHERE session_id = :'session_id'
GROUP BY memory_id
ORDER BY mean_kl DESC NULLS LAST, memory_id;
