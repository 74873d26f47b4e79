-- name: scope_groups --
-- Groups of a scope (memory, session or all; or only scope_key) with min_patches unused patches of this model,
-- measured by this method version.
WITH patches AS (
    SELECT memory_patches.run_id, memory_patches.memory_id,
           CASE %(scope)s WHEN 'memory' THEN 'memory:' || memory_patches.memory_id
                          WHEN 'session' THEN 'session:' || prompts.session_id
                          ELSE 'all' END AS scope_key
    FROM memory_patches
    JOIN measurement_runs ON measurement_runs.id = memory_patches.run_id
    JOIN prompts ON prompts.id = measurement_runs.prompt_id
    WHERE memory_patches.model = %(model)s
      AND memory_patches.model_revision IS NOT DISTINCT FROM %(model_revision)s
      AND measurement_runs.method_version = %(method_version)s
      AND (%(scope)s <> 'session' OR prompts.session_id IS NOT NULL)
)
SELECT patches.scope_key, count(*) AS patches,
       count(*) FILTER (WHERE NOT EXISTS (
           SELECT 1 FROM adapter_patches
           JOIN adapters ON adapters.id = adapter_patches.adapter_id
           WHERE adapter_patches.run_id = patches.run_id AND adapter_patches.memory_id = patches.memory_id
             AND adapters.model = %(model)s AND adapters.scope_key = patches.scope_key
       )) AS new_patches
FROM patches
WHERE %(scope_key)s::text IS NULL OR patches.scope_key = %(scope_key)s::text
GROUP BY patches.scope_key
HAVING count(*) FILTER (WHERE NOT EXISTS (
           SELECT 1 FROM adapter_patches
           JOIN adapters ON adapters.id = adapter_patches.adapter_id
           WHERE adapter_patches.run_id = patches.run_id AND adapter_patches.memory_id = patches.memory_id
             AND adapters.model = %(model)s AND adapters.scope_key = patches.scope_key
       )) >= %(min_patches)s
ORDER BY patches.scope_key;

-- name: scope_patches --
-- Every patch of one group (scope_key) of this model and revision, oldest run first, with its prompt.
SELECT memory_patches.run_id, memory_patches.memory_id, measurement_runs.prompt_id, memory_patches.num_layers,
       memory_patches.d_model, memory_patches.delta, memory_patches.a_tilde, memory_patches.bias_delta
FROM memory_patches
JOIN measurement_runs ON measurement_runs.id = memory_patches.run_id
JOIN prompts ON prompts.id = measurement_runs.prompt_id
WHERE memory_patches.model = %(model)s
  AND memory_patches.model_revision IS NOT DISTINCT FROM %(model_revision)s
  AND measurement_runs.method_version = %(method_version)s
  AND CASE %(scope)s WHEN 'memory' THEN 'memory:' || memory_patches.memory_id
                     WHEN 'session' THEN 'session:' || prompts.session_id
                     ELSE 'all' END = %(scope_key)s
ORDER BY memory_patches.run_id, memory_patches.memory_id;

-- name: patch_models --
-- Which models and revisions one memory's patches were measured on, with how many of each.
SELECT model, model_revision, count(*) AS patches
FROM memory_patches
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
-- One adapter version with its fidelity; returns its id.
INSERT INTO adapters (
    scope, scope_key, memory_id, session_id, model, model_revision, version, layers, rank, ridge, patch_count,
    held_out_count, path, kl_without, kl_adapter_query, kl_adapter_all, recovered_query, recovered_all,
    greedy_match_query, greedy_match_all
) VALUES (
    %(scope)s, %(scope_key)s, %(memory_id)s, %(session_id)s, %(model)s, %(model_revision)s, %(version)s,
    %(layers)s, %(rank)s, %(ridge)s, %(patch_count)s, %(held_out_count)s, %(path)s, %(kl_without)s,
    %(kl_adapter_query)s, %(kl_adapter_all)s, %(recovered_query)s, %(recovered_all)s, %(greedy_match_query)s,
    %(greedy_match_all)s
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
-- Every adapter version, newest first, with its fidelity.
SELECT id, scope_key, model, version, rank, patch_count, held_out_count, recovered_query, recovered_all,
       greedy_match_query, greedy_match_all, kl_without, path, created_at
FROM adapters
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s;
