"""Method version 2: prefixes and memory removal on prompts that exist; the version on every run and view.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24

Runs measured before this revision kept the query at its place in the whole prompt for every prefix and
left a gap where a removed memory was (method version 1); from version 2 the query follows the kept
tokens and removal closes up (docs/method.md). `measurement_runs.method_version` says which: existing
rows get 1, and the column has no default, so every writer must say what it measured. The analytics
views gain the column as their last (CREATE OR REPLACE keeps the read-only role's grants); views that
aggregate over runs group by it. The downgrade restores revision 0004's views (run `icldaemon roles`
again afterwards for the read-only role's grants on them).
"""

import importlib
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "icl_analytics"

RUN_SUMMARY = """
CREATE OR REPLACE VIEW icl_analytics.run_summary AS
SELECT runs.id AS run_id,
       runs.prompt_id,
       prompts.session_id,
       runs.model,
       runs.dtype,
       runs.device,
       runs.created_at,
       prompts.created_at AS submitted_at,
       prompts.attempts,
       extract(epoch FROM runs.created_at - prompts.created_at) AS queue_to_result_s,
       runs.num_layers,
       runs.total_tokens,
       runs.context_tokens,
       runs.stride,
       runs.plain_forward_s,
       runs.measure_s,
       runs.measure_s / nullif(runs.plain_forward_s, 0) AS cost_in_forward_passes,
       runs.context_tokens / nullif(runs.measure_s, 0) AS context_tokens_per_second,
       runs.max_abs_logit_error,
       runs.exactness_kl,
       runs.context_kl,
       (SELECT count(*) FROM memory_effects WHERE memory_effects.run_id = runs.id) AS memories,
       runs.method_version
FROM measurement_runs AS runs
JOIN prompts ON prompts.id = runs.prompt_id
"""

RUN_LAYERS = """
CREATE OR REPLACE VIEW icl_analytics.run_layers AS
WITH measured AS (
    SELECT run_id, layer_idx, token_idx, segment, update_frobenius_norm, cumulative_update_norm,
           bias_update_norm, delta_norm, implicit_learning_rate,
           last_value(update_frobenius_norm) OVER whole_context AS final_update_norm,
           last_value(cumulative_update_norm) OVER whole_context AS final_path_length
    FROM icl_dynamics_log
    WHERE update_frobenius_norm IS NOT NULL
    WINDOW whole_context AS (PARTITION BY run_id, layer_idx ORDER BY token_idx
                             ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
),
bounds AS (
    SELECT *,
           -- the last measured token at which the update norm was still away from its final value
           max(token_idx) FILTER (
               WHERE abs(update_frobenius_norm - final_update_norm) > 0.1 * final_update_norm
           ) OVER (PARTITION BY run_id, layer_idx) AS last_unsettled_token_idx
    FROM measured
),
per_layer AS (
    SELECT run_id, layer_idx,
           count(*) AS measured_tokens,
           max(token_idx) AS final_token_idx,
           min(token_idx) FILTER (WHERE token_idx > coalesce(last_unsettled_token_idx, -1)) AS saturation_token_idx,
           min(token_idx) FILTER (
               WHERE cumulative_update_norm >= (1 - 0.1) * final_path_length
           ) AS path_saturation_token_idx,
           max(final_update_norm) AS final_update_norm,
           max(final_path_length) AS final_path_length,
           (array_agg(bias_update_norm ORDER BY token_idx DESC))[1] AS final_bias_update_norm,
           (array_agg(delta_norm ORDER BY token_idx DESC))[1] AS final_delta_norm,
           (array_agg(implicit_learning_rate ORDER BY token_idx DESC))[1] AS final_implicit_learning_rate,
           max(update_frobenius_norm) AS peak_update_norm
    FROM bounds
    GROUP BY run_id, layer_idx
)
SELECT per_layer.run_id,
       runs.model,
       prompts.session_id,
       runs.created_at,
       per_layer.layer_idx,
       runs.num_layers,
       runs.context_tokens,
       per_layer.measured_tokens,
       per_layer.final_update_norm,
       per_layer.final_path_length,
       per_layer.final_bias_update_norm,
       per_layer.final_delta_norm,
       per_layer.final_implicit_learning_rate,
       per_layer.peak_update_norm,
       per_layer.saturation_token_idx,
       (per_layer.saturation_token_idx + 1)::double precision / runs.context_tokens AS saturation_fraction,
       per_layer.path_saturation_token_idx,
       (per_layer.path_saturation_token_idx + 1)::double precision / runs.context_tokens AS path_saturation_fraction,
       per_layer.final_update_norm / nullif(sum(per_layer.final_update_norm) OVER run, 0) AS update_norm_share,
       per_layer.final_bias_update_norm / nullif(sum(per_layer.final_bias_update_norm) OVER run, 0)
           AS bias_update_norm_share,
       runs.method_version
FROM per_layer
JOIN measurement_runs AS runs ON runs.id = per_layer.run_id
JOIN prompts ON prompts.id = runs.prompt_id
WINDOW run AS (PARTITION BY per_layer.run_id)
"""

MEMORY_IMPACT = """
CREATE OR REPLACE VIEW icl_analytics.memory_impact AS
SELECT effects.run_id,
       effects.memory_id,
       memories.key AS memory_key,
       runs.model,
       prompts.session_id,
       runs.created_at,
       effects.segment,
       effects.token_end - effects.token_start AS memory_tokens,
       effects.kl,
       effects.patched_kl,
       effects.max_abs_logit_error,
       norms.mean_update_norm,
       norms.max_update_norm,
       norms.peak_layer_idx,
       norms.total_update_norm,
       (SELECT avg(norm) FROM unnest(effects.bias_update_norm) AS norm) AS mean_bias_update_norm,
       runs.method_version
FROM memory_effects AS effects
JOIN measurement_runs AS runs ON runs.id = effects.run_id
JOIN prompts ON prompts.id = runs.prompt_id
LEFT JOIN memories ON memories.id = effects.memory_id
CROSS JOIN LATERAL (
    SELECT avg(layer.norm) AS mean_update_norm,
           max(layer.norm) AS max_update_norm,
           -- the whole patch's Frobenius norm over all layers
           sqrt(sum(layer.norm * layer.norm)) AS total_update_norm,
           (array_agg(layer.layer_number - 1 ORDER BY layer.norm DESC NULLS LAST))[1]::integer AS peak_layer_idx
    FROM unnest(effects.update_frobenius_norm) WITH ORDINALITY AS layer(norm, layer_number)
) AS norms
"""

MEMORY_RANKING = """
CREATE OR REPLACE VIEW icl_analytics.memory_ranking AS
WITH per_memory AS (
    SELECT model, method_version, memory_id, max(memory_key) AS memory_key,
           count(*) AS runs,
           avg(kl) AS mean_kl,
           avg(mean_update_norm) AS mean_update_norm,
           avg(total_update_norm) AS mean_total_update_norm,
           avg(mean_bias_update_norm) AS mean_bias_update_norm,
           mode() WITHIN GROUP (ORDER BY peak_layer_idx) AS usual_peak_layer_idx,
           max(created_at) AS last_measured_at
    FROM icl_analytics.memory_impact
    GROUP BY model, method_version, memory_id
)
SELECT model, memory_id, memory_key, runs, mean_kl, mean_update_norm, mean_total_update_norm,
       mean_bias_update_norm, usual_peak_layer_idx, last_measured_at,
       rank() OVER (PARTITION BY model, method_version ORDER BY mean_kl DESC NULLS LAST) AS kl_rank,
       rank() OVER (PARTITION BY model, method_version ORDER BY mean_total_update_norm DESC NULLS LAST)
           AS update_norm_rank,
       method_version
FROM per_memory
"""

SESSION_SUMMARY = """
CREATE OR REPLACE VIEW icl_analytics.session_summary AS
WITH per_session AS (
    SELECT prompts.session_id,
           count(*) AS prompts,
           count(*) FILTER (WHERE prompts.status = 'done') AS done,
           count(*) FILTER (WHERE prompts.status = 'failed') AS failed,
           count(*) FILTER (WHERE prompts.status IN ('queued', 'running')) AS pending,
           min(prompts.created_at) AS first_prompt_at,
           max(coalesce(prompts.finished_at, prompts.created_at)) AS last_activity_at
    FROM prompts
    GROUP BY prompts.session_id
),
versioned_runs AS (
    SELECT prompts.session_id, runs.*,
           max(runs.method_version) OVER (PARTITION BY prompts.session_id) AS newest_method_version
    FROM measurement_runs AS runs
    JOIN prompts ON prompts.id = runs.prompt_id
),
session_runs AS (
    -- counts and costs over every run; the context's KL only over the newest method version's runs
    SELECT session_id,
           count(*) AS runs,
           sum(context_tokens) AS context_tokens,
           avg(context_kl) FILTER (WHERE method_version = newest_method_version) AS mean_context_kl,
           max(max_abs_logit_error) AS max_abs_logit_error,
           sum(measure_s) AS measure_s,
           max(newest_method_version) AS method_version
    FROM versioned_runs
    GROUP BY session_id
),
session_memories AS (
    SELECT prompts.session_id, count(DISTINCT retrievals.memory_id) AS distinct_memories
    FROM memory_retrievals AS retrievals
    JOIN prompts ON prompts.id = retrievals.prompt_id
    GROUP BY prompts.session_id
)
SELECT per_session.*,
       coalesce(session_runs.runs, 0) AS runs,
       coalesce(session_runs.context_tokens, 0) AS context_tokens,
       session_runs.mean_context_kl,
       session_runs.max_abs_logit_error,
       session_runs.measure_s,
       coalesce(session_memories.distinct_memories, 0) AS distinct_memories,
       session_runs.method_version
FROM per_session
LEFT JOIN session_runs ON session_runs.session_id IS NOT DISTINCT FROM per_session.session_id
LEFT JOIN session_memories ON session_memories.session_id IS NOT DISTINCT FROM per_session.session_id
"""

EXACTNESS_HOURLY = """
CREATE OR REPLACE VIEW icl_analytics.exactness_hourly AS
WITH checks AS (
    SELECT runs.created_at, runs.model, runs.dtype, runs.max_abs_logit_error, runs.exactness_kl, runs.method_version,
           (SELECT max(effects.max_abs_logit_error) FROM memory_effects AS effects
            WHERE effects.run_id = runs.id) AS memory_max_abs_logit_error
    FROM measurement_runs AS runs
)
SELECT date_trunc('hour', created_at) AS hour,
       model,
       dtype,
       count(*) AS runs,
       max(max_abs_logit_error) AS max_abs_logit_error,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY max_abs_logit_error) AS p95_abs_logit_error,
       max(exactness_kl) AS max_exactness_kl,
       max(memory_max_abs_logit_error) AS memory_max_abs_logit_error,
       method_version
FROM checks
GROUP BY 1, 2, 3, method_version
"""

COMMENTS = {
    'run_summary': "One row per measurement run: size, cost against one forward pass, throughput, exactness (largest logit error and KL of the patched run), the context's KL, and the time from submission to result. method_version: the definition of prefixes and removal that produced the run (docs/method.md).",
    'run_layers': "Per run and layer: where does context stop teaching (saturation_token_idx: the update norm stays within 10% of its final value from there on; path_saturation_token_idx: the path length has covered 90%), and which layers absorb the context (update_norm_share: this layer's share of the final update norm summed over layers).",
    'memory_impact': 'Per run and retrieved memory: how far removing the memory moves the model, in behaviour (kl) and in implicit weights (per-layer update norms: mean, max, whole patch, peak layer).',
    'memory_ranking': 'Per model, method version and memory: which memories move the model most, ranked by mean KL and by mean whole-patch update norm; where the two ranks disagree, the weights and the behaviour tell different stories.',
    'session_summary': "Per session (NULL: prompts without one): prompts by status, runs, context tokens, mean context KL, worst exactness error, measurement time, distinct memories retrieved. The mean context KL is over the runs of the session's newest method version.",
    'exactness_hourly': "Per hour, model, dtype and method version: the exactness check's worst and 95th-percentile logit error and worst KL, for the runs and for their memories' patches; a rise is a health signal.",
}

VIEWS = {
    'run_summary': RUN_SUMMARY,
    'run_layers': RUN_LAYERS,
    'memory_impact': MEMORY_IMPACT,
    'memory_ranking': MEMORY_RANKING,
    'session_summary': SESSION_SUMMARY,
    'exactness_hourly': EXACTNESS_HOURLY,
}


def upgrade() -> None:
    op.add_column("measurement_runs", sa.Column("method_version", sa.SmallInteger(), nullable=True))
    op.execute("UPDATE measurement_runs SET method_version = 1")
    op.alter_column("measurement_runs", "method_version", nullable=False)
    for name, definition in VIEWS.items():
        op.execute(definition)
        comment = COMMENTS[name].replace("'", "''")
        op.execute(f"COMMENT ON VIEW {SCHEMA}.{name} IS '{comment}'")


def downgrade() -> None:
    previous = importlib.import_module("icldaemon.store.migrations.versions.0004_analytics")
    op.execute(f"DROP SCHEMA {SCHEMA} CASCADE")
    previous.upgrade()
    op.drop_column("measurement_runs", "method_version")
