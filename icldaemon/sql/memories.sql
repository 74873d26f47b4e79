-- name: lock_memory_key --
-- Serialise the upserts of one key until the transaction ends (memories.key is not unique).
SELECT pg_advisory_xact_lock(hashtextextended('icldaemon memory ' || %(key)s, 0));

-- name: memory_by_key --
-- The lowest-id memory with this key, locked for the upsert; no row when none has it.
SELECT id, content FROM memories WHERE key = %(key)s ORDER BY id LIMIT 1 FOR UPDATE;

-- name: update_memory_content --
-- Replace one memory's content.
UPDATE memories SET content = %(content)s WHERE id = %(memory_id)s;

-- name: insert_memory --
-- A new memory; returns its id.
INSERT INTO memories (key, content) VALUES (%(key)s, %(content)s) RETURNING id;

-- name: list_memories --
-- The memories by id with how often each was retrieved and measured, and how many there are in all.
SELECT memories.id, memories.key, memories.content,
       (SELECT count(*) FROM memory_retrievals WHERE memory_retrievals.memory_id = memories.id) AS retrievals,
       (SELECT count(*) FROM memory_effects WHERE memory_effects.memory_id = memories.id) AS measured,
       count(*) OVER () AS total
FROM memories
ORDER BY memories.id
LIMIT %(limit)s;
