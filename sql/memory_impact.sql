-- Which memories move the model most, and does the size of their implicit weight patch agree with
-- their behavioural effect? Per memory (view icl_analytics.memory_ranking): the mean KL between the
-- model with and without the memory in context, and the mean norm of the exact patch that removing it
-- amounts to (all layers together), each ranked. The agreement is Spearman's rank correlation between
-- the two over a model's memories: near 1, the patches that are large are the ones that matter.
--
-- Variables (psql -v NAME=VALUE; from Python or `icldaemon query`, parameters of the same names),
-- and the whole file in psql ($URL: the database, e.g. the URL `icldaemon db` prints):
--   model      the model's name as runs store it (`icldaemon runs` shows it), e.g. SmolLM2-135M-Instruct
--   memory_id  a memory's id (`icldaemon memories list`)
--
--   psql "$URL" -v model=SmolLM2-135M-Instruct -v memory_id=1 -f sql/memory_impact.sql

-- name: memories_by_impact --
-- One model's memories, most behavioural effect first, with their patch norm, both ranks and the layer where their patch peaks.
SELECT ranking.memory_id,
       ranking.memory_key,
       ranking.runs,
       ranking.mean_kl,
       ranking.kl_rank,
       ranking.mean_total_update_norm,
       ranking.update_norm_rank,
       ranking.mean_bias_update_norm,
       ranking.usual_peak_layer_idx,
       ranking.last_measured_at
FROM icl_analytics.memory_ranking AS ranking
WHERE ranking.model = :'model'
ORDER BY ranking.kl_rank, ranking.memory_id;

-- name: impact_agreement --
-- Over one model's memories: Spearman's rank correlation between mean KL and mean patch norm (ties get their average rank), and Pearson's on the values.
WITH ranked AS (
    SELECT mean_kl, mean_total_update_norm,
           rank() OVER (ORDER BY mean_kl) + (count(*) OVER (PARTITION BY mean_kl) - 1) / 2.0 AS kl_rank,
           rank() OVER (ORDER BY mean_total_update_norm)
               + (count(*) OVER (PARTITION BY mean_total_update_norm) - 1) / 2.0 AS update_norm_rank
    FROM icl_analytics.memory_ranking
    WHERE model = :'model' AND mean_kl IS NOT NULL AND mean_total_update_norm IS NOT NULL
)
SELECT count(*) AS memories,
       corr(kl_rank, update_norm_rank) AS spearman_kl_vs_update_norm,
       corr(mean_kl, mean_total_update_norm) AS pearson_kl_vs_update_norm
FROM ranked;

-- name: memory_layers --
-- One memory under one model, per layer: the mean update norm and bias update norm of its patches, and each layer's share of the whole.
SELECT layer.layer_number - 1 AS layer_idx,
       count(*) AS runs,
       avg(layer.update_norm) AS mean_update_norm,
       avg(layer.bias_update_norm) AS mean_bias_update_norm,
       sum(layer.update_norm) / nullif(sum(sum(layer.update_norm)) OVER (), 0) AS update_norm_share
FROM memory_effects AS effects
JOIN measurement_runs AS runs ON runs.id = effects.run_id
CROSS JOIN LATERAL unnest(effects.update_frobenius_norm, effects.bias_update_norm)
     WITH ORDINALITY AS layer(update_norm, bias_update_norm, layer_number)
WHERE effects.memory_id = :memory_id AND runs.model = :'model'
GROUP BY layer.layer_number
ORDER BY layer.layer_number;
