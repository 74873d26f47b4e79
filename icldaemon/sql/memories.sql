-- name: put_memory --
-- Add a memory of the session user's under a key, or replace the content of its lowest-id one with that key (revision 0009's function, which a submitter may call).
SELECT memory_id, outcome FROM icl_put_memory(%(key)s, %(content)s);

-- name: list_memories --
-- The memories by id with how often each was retrieved and measured, and how many there are in all.
SELECT memories.id, memories.key, memories.content,
       (SELECT count(*) FROM memory_retrievals WHERE memory_retrievals.memory_id = memories.id) AS retrievals,
       (SELECT count(*) FROM memory_effects WHERE memory_effects.memory_id = memories.id) AS measured,
       count(*) OVER () AS total
FROM memories
ORDER BY memories.id
LIMIT %(limit)s;

-- name: memory_to_learn --
-- A memory's key and content, and up to %(neighbours)s other memories of its submitter, nearest ids first (the retrievals beside it in its learn prompts).
SELECT memories.key, memories.content,
       ARRAY(SELECT others.id FROM memories AS others
             WHERE others.submitted_by = memories.submitted_by AND others.id <> memories.id
             ORDER BY abs(others.id - memories.id), others.id
             LIMIT %(neighbours)s) AS neighbour_ids
FROM memories
WHERE memories.id = %(memory_id)s;

-- name: learnable_memories --
-- The memories with a key whose retrievals the session user may attach to its prompts (its own; every one for the schema owner or with icl_config.share_memories), by id.
SELECT memories.id
FROM memories
WHERE memories.key IS NOT NULL AND btrim(memories.key) <> ''
  AND (memories.submitted_by = session_user OR icl_is_schema_owner()
       OR (SELECT icl_config.share_memories FROM icl_config))
ORDER BY memories.id;

-- name: sessions_with_prompts --
-- Which of the given sessions hold a prompt (of any submitter).
SELECT DISTINCT prompts.session_id FROM prompts WHERE prompts.session_id = ANY(%(session_ids)s::uuid[]);

-- name: own_session_prompts --
-- How many prompts the session user submitted in a session.
SELECT count(*) FROM icl_own_prompts WHERE icl_own_prompts.session_id = %(session_id)s::uuid;
