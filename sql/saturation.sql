-- Where does context stop teaching? For every layer, the context token after which the implicit weight
-- update stops changing: the update norm ||dW||_F stays within 10% of its final value from that token
-- to the end of the context (saturation_*), and the path length of the implicit descent (the running sum
-- of the marginal updates) has covered 90% of its total (path_saturation_*). As a fraction of the
-- context: near 1, every token still teaches; near 0, the first few tokens taught all there was.
-- Read from the view icl_analytics.run_layers (one row per run and layer).
--
-- Variables (psql -v NAME=VALUE; from Python or `icldaemon query`, parameters of the same names),
-- and the whole file in psql ($URL: the database, e.g. the URL `icldaemon db` prints):
--   model   the model's name as runs store it (`icldaemon runs` shows it), e.g. SmolLM2-135M-Instruct
--   since   the earliest time counted, e.g. 2026-11-01 or '2026-11-01 12:00+00'
--   run_id  a measurement run's id (`icldaemon runs` lists them)
--
--   psql "$URL" -v model=SmolLM2-135M-Instruct -v since=2026-11-01 -v run_id=1 -f sql/saturation.sql

-- name: saturation_by_layer --
-- Per layer, over one model's runs since a time: where the update norm and the path length saturate, as a share of the context.
SELECT layer_idx,
       count(*) AS runs,
       avg(saturation_fraction) AS mean_saturation_fraction,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY saturation_fraction) AS median_saturation_fraction,
       avg(path_saturation_fraction) AS mean_path_saturation_fraction,
       avg(final_update_norm) AS mean_final_update_norm,
       avg(context_tokens) AS mean_context_tokens
FROM icl_analytics.run_layers
WHERE model = :'model' AND created_at >= :'since'
GROUP BY layer_idx
ORDER BY layer_idx;

-- name: run_saturation --
-- One run, per layer: the token at which its update norm and its path length saturate, with that token's segment and memory (its text is the text reader's: icl_dynamics_log.token_text).
SELECT layers.layer_idx,
       layers.saturation_token_idx,
       layers.saturation_fraction,
       saturation_token.segment AS saturation_segment,
       saturation_token.memory_id AS saturation_memory_id,
       layers.path_saturation_token_idx,
       layers.path_saturation_fraction,
       layers.final_update_norm,
       layers.final_path_length
FROM icl_analytics.run_layers AS layers
LEFT JOIN icl_dynamics_log AS saturation_token
       ON saturation_token.run_id = layers.run_id
      AND saturation_token.layer_idx = layers.layer_idx
      AND saturation_token.token_idx = layers.saturation_token_idx
WHERE layers.run_id = :run_id
ORDER BY layers.layer_idx;
