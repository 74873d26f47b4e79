-- name: insert_measurement_run --
-- One measurement run of one prompt; returns its id.
INSERT INTO measurement_runs (
    prompt_id, model, dtype, device, num_layers, total_tokens, context_tokens, anchor_tokens, query_position,
    stride, plain_forward_s, measure_s, max_abs_logit_error, exactness_kl, context_kl
) VALUES (
    %(prompt_id)s, %(model)s, %(dtype)s, %(device)s, %(num_layers)s, %(total_tokens)s, %(context_tokens)s,
    %(anchor_tokens)s, %(query_position)s, %(stride)s, %(plain_forward_s)s, %(measure_s)s,
    %(max_abs_logit_error)s, %(exactness_kl)s, %(context_kl)s
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
INSERT INTO memory_patches (run_id, memory_id, model, num_layers, d_model, delta, a_tilde, bias_delta)
VALUES (%(run_id)s, %(memory_id)s, %(model)s, %(num_layers)s, %(d_model)s, %(delta)s, %(a_tilde)s, %(bias_delta)s);
