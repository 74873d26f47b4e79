-- name: recent_runs --
-- The newest measurement runs with their prompt, session, size, exactness and cost.
SELECT measurement_runs.id AS run_id, measurement_runs.prompt_id, prompts.session_id, measurement_runs.model,
       measurement_runs.total_tokens, measurement_runs.context_tokens,
       (SELECT count(*) FROM memory_retrievals WHERE memory_retrievals.prompt_id = prompts.id) AS memories,
       measurement_runs.max_abs_logit_error, measurement_runs.measure_s, measurement_runs.plain_forward_s,
       measurement_runs.created_at
FROM measurement_runs
JOIN prompts ON prompts.id = measurement_runs.prompt_id
ORDER BY measurement_runs.id DESC
LIMIT %(limit)s;

-- name: runs_of_prompts --
-- The measurement runs of the given prompts, by prompt.
SELECT id AS run_id, prompt_id FROM measurement_runs WHERE prompt_id = ANY(%(prompt_ids)s::bigint[])
ORDER BY prompt_id, id;
