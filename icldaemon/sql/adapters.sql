-- name: scope_groups --
-- Groups of a scope (or only scope_key) with min_patches answer patches of this model, revision and method version unused by its adapters.
WITH patches AS (
    SELECT answers.run_id, answers.memory_id,
           CASE %(scope)s WHEN 'memory' THEN 'memory:' || answers.memory_id
                          WHEN 'session' THEN 'session:' || prompts.session_id
                          ELSE 'all' END AS scope_key
    FROM memory_answer_patches AS answers
    JOIN measurement_runs ON measurement_runs.id = answers.run_id
    JOIN prompts ON prompts.id = measurement_runs.prompt_id
    WHERE answers.model = %(model)s
      AND answers.model_revision IS NOT DISTINCT FROM %(model_revision)s
      AND measurement_runs.method_version = %(method_version)s
      AND (%(scope)s <> 'session' OR prompts.session_id IS NOT NULL)
),
counted AS (
    SELECT patches.scope_key, count(*) AS patches,
           count(*) FILTER (WHERE NOT EXISTS (
               SELECT 1 FROM adapter_patches
               JOIN adapters ON adapters.id = adapter_patches.adapter_id
               WHERE adapter_patches.run_id = patches.run_id AND adapter_patches.memory_id = patches.memory_id
                 AND adapters.model = %(model)s AND adapters.scope_key = patches.scope_key
                 AND adapters.method = 'down_projection'
           )) AS new_patches
    FROM patches
    WHERE %(scope_key)s::text IS NULL OR patches.scope_key = %(scope_key)s::text
    GROUP BY patches.scope_key
)
SELECT scope_key, patches, new_patches
FROM counted
WHERE new_patches >= %(min_patches)s
ORDER BY scope_key;

-- name: scope_answer_patches --
-- Every answer patch of one group (scope_key) of this model, revision and method version, oldest run first.
SELECT answers.run_id, answers.memory_id, measurement_runs.prompt_id, answers.num_layers, answers.d_model,
       answers.answer_ids, answers.a_tilde, answers.value, answers.max_abs_log_prob_error
FROM memory_answer_patches AS answers
JOIN measurement_runs ON measurement_runs.id = answers.run_id
JOIN prompts ON prompts.id = measurement_runs.prompt_id
WHERE answers.model = %(model)s
  AND answers.model_revision IS NOT DISTINCT FROM %(model_revision)s
  AND measurement_runs.method_version = %(method_version)s
  AND CASE %(scope)s WHEN 'memory' THEN 'memory:' || answers.memory_id
                     WHEN 'session' THEN 'session:' || prompts.session_id
                     ELSE 'all' END = %(scope_key)s
ORDER BY answers.run_id, answers.memory_id;

-- name: patch_models --
-- Which models and revisions one memory's answer patches were measured on, with how many of each.
SELECT model, model_revision, count(*) AS patches
FROM memory_answer_patches
WHERE memory_id = %(memory_id)s
GROUP BY model, model_revision
ORDER BY count(*) DESC;

-- name: prompt_source --
-- A prompt's chat messages or raw text, for rebuilding it as it was measured.
SELECT messages, text FROM prompts WHERE id = %(prompt_id)s;

-- name: lock_scope --
-- A session advisory lock on one model's group, so that two daemons never consolidate it at once.
SELECT pg_try_advisory_lock(hashtextextended('icldaemon consolidate ' || %(model)s || ' ' || %(scope_key)s, 0));

-- name: unlock_scope --
-- Release the lock taken by lock_scope.
SELECT pg_advisory_unlock(hashtextextended('icldaemon consolidate ' || %(model)s || ' ' || %(scope_key)s, 0));

-- name: next_adapter_version --
-- The version number the next adapter of this model and group gets.
SELECT coalesce(max(version), 0) + 1 FROM adapters WHERE model = %(model)s AND scope_key = %(scope_key)s;

-- name: adapter_paths --
-- Every listed adapter directory of this model and group (others on disk there are leftovers).
SELECT path FROM adapters WHERE model = %(model)s AND scope_key = %(scope_key)s;

-- name: insert_adapter --
-- One adapter version with its method, the quality gate's verdict and its figures; returns its id.
INSERT INTO adapters (
    scope, scope_key, memory_id, session_id, model, model_revision, version, layers, rank, ridge, patch_count,
    held_out_count, path, method, status, status_reason, preservation, fit_seconds, answer_examples,
    with_memory_rate, without_memory_rate, adapter_rate, answer_kl_without, answer_kl_adapter, next_token_kl_share,
    neutral_prompts, neutral_kl, neutral_next_token_unchanged, neutral_continuation_unchanged, leak_examples,
    leak_rate
) VALUES (
    %(scope)s, %(scope_key)s, %(memory_id)s, %(session_id)s, %(model)s, %(model_revision)s, %(version)s,
    %(layers)s, %(rank)s, %(ridge)s, %(patch_count)s, %(held_out_count)s, %(path)s, %(method)s, %(status)s,
    %(status_reason)s, %(preservation)s, %(fit_seconds)s, %(answer_examples)s, %(with_memory_rate)s,
    %(without_memory_rate)s, %(adapter_rate)s, %(answer_kl_without)s, %(answer_kl_adapter)s,
    %(next_token_kl_share)s, %(neutral_prompts)s, %(neutral_kl)s, %(neutral_next_token_unchanged)s,
    %(neutral_continuation_unchanged)s, %(leak_examples)s, %(leak_rate)s
)
RETURNING id;

-- name: insert_adapter_patch --
-- A patch an adapter was fitted on or checked against.
INSERT INTO adapter_patches (adapter_id, run_id, memory_id, role)
VALUES (%(adapter_id)s, %(run_id)s, %(memory_id)s, %(role)s);

-- name: mark_patches_consolidated --
-- Stamp the patches an adapter used (the first consolidation that used a patch keeps its time).
UPDATE memory_patches
SET consolidated_at = coalesce(memory_patches.consolidated_at, now())
FROM adapter_patches
WHERE adapter_patches.adapter_id = %(adapter_id)s
  AND memory_patches.run_id = adapter_patches.run_id AND memory_patches.memory_id = adapter_patches.memory_id;

-- name: list_adapters --
-- Every adapter version, newest first, with its status, figures and how many memories it covers; current: the newest accepted of its group.
SELECT id, scope_key, model, version, method, status, status_reason, rank, patch_count, held_out_count,
       with_memory_rate, without_memory_rate, adapter_rate, answer_kl_without, answer_kl_adapter, neutral_kl,
       neutral_next_token_unchanged, leak_rate, next_token_kl_share, recovered_all, path, created_at,
       (SELECT count(DISTINCT used.memory_id) FROM adapter_patches AS used WHERE used.adapter_id = adapters.id)
           AS memories,
       id = (SELECT current.id FROM adapters AS current
             WHERE current.model = adapters.model AND current.scope_key = adapters.scope_key
               AND current.status = 'accepted'
             ORDER BY current.version DESC LIMIT 1) AS current
FROM adapters
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s;

-- name: adapter_by_id --
-- One adapter version: where it is, what it covers, the weights it was fitted on, its status and why.
SELECT id, scope, scope_key, memory_id, model, model_revision, version, method, status, status_reason, path
FROM adapters
WHERE id = %(adapter_id)s;

-- name: adapter_memories --
-- The memories an adapter version was fitted on, with their content.
SELECT DISTINCT memories.id, memories.key, memories.content
FROM adapter_patches
JOIN memories ON memories.id = adapter_patches.memory_id
WHERE adapter_patches.adapter_id = %(adapter_id)s
ORDER BY memories.id;
