-- name: insert_measurement_run --
-- One measurement run of one prompt; returns its id.
INSERT INTO measurement_runs (
    prompt_id, model, dtype, device, num_layers, total_tokens, context_tokens, anchor_tokens, query_position,
    stride, plain_forward_s, measure_s, max_abs_logit_error, exactness_kl, context_kl, method_version, prompt_hash
) VALUES (
    %(prompt_id)s, %(model)s, %(dtype)s, %(device)s, %(num_layers)s, %(total_tokens)s, %(context_tokens)s,
    %(anchor_tokens)s, %(query_position)s, %(stride)s, %(plain_forward_s)s, %(measure_s)s,
    %(max_abs_logit_error)s, %(exactness_kl)s, %(context_kl)s, %(method_version)s, %(prompt_hash)s
)
RETURNING id;

-- name: insert_memory_effect --
-- What removing one memory from the run's context changes: KL, patch check, per-layer norms.
INSERT INTO memory_effects (
    run_id, memory_id, segment, token_start, token_end, kl, max_abs_logit_error, patched_kl,
    update_frobenius_norm, bias_update_norm
) VALUES (
    %(run_id)s, %(memory_id)s, %(segment)s, %(token_start)s, %(token_end)s, %(kl)s, %(max_abs_logit_error)s,
    %(patched_kl)s, %(update_frobenius_norm)s, %(bias_update_norm)s
);

-- name: insert_memory_patch --
-- The rank-1 factors of one memory's patch, float32 little-endian [num_layers, d_model] each.
INSERT INTO memory_patches (run_id, memory_id, model, model_revision, num_layers, d_model, delta, a_tilde, bias_delta)
VALUES (%(run_id)s, %(memory_id)s, %(model)s, %(model_revision)s, %(num_layers)s, %(d_model)s, %(delta)s,
        %(a_tilde)s, %(bias_delta)s);

-- name: insert_memory_answer_patch --
-- One memory's patch at each answer position: answer ids, a_tilde and value (float16 [layers, positions, d_model]), check.
INSERT INTO memory_answer_patches (run_id, memory_id, model, model_revision, num_layers, d_model, answer_ids, a_tilde,
                                   value, max_abs_log_prob_error)
VALUES (%(run_id)s, %(memory_id)s, %(model)s, %(model_revision)s, %(num_layers)s, %(d_model)s, %(answer_ids)s,
        %(a_tilde)s, %(value)s, %(max_abs_log_prob_error)s);

-- name: session_prompt_exactness --
-- Per measured prompt of one session: its size, the patch check's error, and the context's effect.
SELECT prompts.id AS prompt_id,
       CASE WHEN prompts.text IS NULL THEN 'chat' ELSE 'text' END AS kind,
       measurement_runs.context_tokens, measurement_runs.num_layers, measurement_runs.max_abs_logit_error,
       measurement_runs.exactness_kl, measurement_runs.context_kl, measurement_runs.measure_s
FROM prompts
JOIN measurement_runs ON measurement_runs.prompt_id = prompts.id
WHERE prompts.session_id = %(session_id)s
ORDER BY prompts.id;

-- name: session_memory_effects --
-- Per memory retrieved in one session: how often it was measured, its mean KL and mean per-layer update norm.
SELECT memories.id AS memory_id, memories.key, count(*) AS runs, avg(memory_effects.kl) AS mean_kl,
       avg((SELECT avg(norm) FROM unnest(memory_effects.update_frobenius_norm) AS norm)) AS mean_update_norm,
       avg((SELECT avg(norm) FROM unnest(memory_effects.bias_update_norm) AS norm)) AS mean_bias_update_norm
FROM memory_effects
JOIN measurement_runs ON measurement_runs.id = memory_effects.run_id
JOIN prompts ON prompts.id = measurement_runs.prompt_id
JOIN memories ON memories.id = memory_effects.memory_id
WHERE prompts.session_id = %(session_id)s
GROUP BY memories.id, memories.key
ORDER BY mean_kl DESC NULLS LAST;

-- name: session_final_update_norm_by_layer --
-- Per layer, over one session's runs: the mean update norm after the whole context (the last measured token).
SELECT layer_idx, avg(update_frobenius_norm) AS final_update_norm, avg(bias_update_norm) AS final_bias_update_norm
FROM (
    SELECT DISTINCT ON (run_id, layer_idx) run_id, layer_idx, update_frobenius_norm, bias_update_norm
    FROM icl_dynamics_log
    WHERE session_id = %(session_id)s AND update_frobenius_norm IS NOT NULL
    ORDER BY run_id, layer_idx, token_idx DESC
) AS last_token
GROUP BY layer_idx
ORDER BY layer_idx;
