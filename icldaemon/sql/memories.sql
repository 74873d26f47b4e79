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
