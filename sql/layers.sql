-- Which layers absorb the context? For each layer, its share of the implicit weight update (||dW||_F
-- after the whole context, divided by the sum over the run's layers) and of the bias patch, averaged
-- over one model's runs, beside the raw norms and the implicit learning rate 1/||a~||^2 at the end of
-- the context. Read from the view icl_analytics.run_layers.
--
-- Variables (psql -v NAME=VALUE; from Python or `icldaemon query`, parameters of the same names),
-- and the whole file in psql ($URL: the database, e.g. the URL `icldaemon db` prints):
--   model  the model's name as runs store it (`icldaemon runs` shows it), e.g. SmolLM2-135M-Instruct
--   since  the earliest time counted, e.g. 2026-11-01 or '2026-11-01 12:00+00'
--
--   psql "$URL" -v model=SmolLM2-135M-Instruct -v since=2026-11-01 -f sql/layers.sql

-- name: layers_absorbing_context --
-- Per layer of one model, over its runs since a time: mean share of the update norm and of the bias update norm, and the mean final norms.
SELECT layer_idx,
       count(*) AS runs,
       avg(update_norm_share) AS mean_update_norm_share,
       avg(bias_update_norm_share) AS mean_bias_update_norm_share,
       avg(final_update_norm) AS mean_final_update_norm,
       avg(final_bias_update_norm) AS mean_final_bias_update_norm,
       avg(final_delta_norm) AS mean_final_delta_norm,
       avg(final_implicit_learning_rate) AS mean_final_implicit_learning_rate
FROM icl_analytics.run_layers
WHERE model = :'model' AND created_at >= :'since'
GROUP BY layer_idx
ORDER BY layer_idx;
