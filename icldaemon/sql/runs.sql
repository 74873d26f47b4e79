-- name: measurement_run --
-- One measurement run's model, size and exactness, by id.
SELECT id, prompt_id, model, num_layers, context_tokens, stride, max_abs_logit_error, created_at
FROM measurement_runs
WHERE id = %(run_id)s;

-- name: run_dynamics --
-- Every (layer, context token) row of one run, layer by layer, in token order.
SELECT layer_idx, token_idx, token_text, segment, delta_norm, update_frobenius_norm, marginal_update_norm,
       cumulative_update_norm, implicit_learning_rate, bias_update_norm
FROM icl_dynamics_log
WHERE run_id = %(run_id)s
ORDER BY layer_idx, token_idx;
