-- name: claim_prompt --
-- Claim the queued prompt of highest priority (oldest first) that is due, or a running one whose lease expired.
WITH candidate AS (
    SELECT id
    FROM prompts
    WHERE (status = 'queued' AND (next_attempt_at IS NULL OR next_attempt_at <= now()))
       OR (status = 'running' AND lease_expires_at < now())
    ORDER BY priority DESC, created_at, id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
UPDATE prompts
SET status = 'running',
    attempts = prompts.attempts + 1,
    worker_id = %(worker_id)s,
    lease_expires_at = now() + make_interval(secs => %(lease_seconds)s),
    next_attempt_at = NULL,
    started_at = now()
FROM candidate
WHERE prompts.id = candidate.id
RETURNING prompts.id, prompts.attempts, prompts.session_id, prompts.messages, prompts.text;

-- name: renew_lease --
-- Extend the lease of a prompt this worker still holds; no row back means the lease was lost.
UPDATE prompts
SET lease_expires_at = now() + make_interval(secs => %(lease_seconds)s)
WHERE id = %(prompt_id)s AND status = 'running' AND worker_id = %(worker_id)s AND attempts = %(attempts)s
RETURNING id;

-- name: release_prompt --
-- Put a held prompt back in the queue without counting the attempt (the worker is stopping).
UPDATE prompts
SET status = 'queued', attempts = greatest(attempts - 1, 0), worker_id = NULL, lease_expires_at = NULL
WHERE id = %(prompt_id)s AND status = 'running' AND worker_id = %(worker_id)s AND attempts = %(attempts)s
RETURNING id;

-- name: retry_prompt --
-- Requeue a held prompt after a failed attempt, due again after the backoff, keeping the error.
UPDATE prompts
SET status = 'queued', worker_id = NULL, lease_expires_at = NULL, last_error = %(error)s,
    next_attempt_at = now() + make_interval(secs => %(backoff_seconds)s)
WHERE id = %(prompt_id)s AND status = 'running' AND worker_id = %(worker_id)s AND attempts = %(attempts)s
RETURNING id;

-- name: fail_prompt --
-- Mark a held prompt failed for good, with the error text.
UPDATE prompts
SET status = 'failed', worker_id = NULL, lease_expires_at = NULL, last_error = %(error)s, finished_at = now()
WHERE id = %(prompt_id)s AND status = 'running' AND worker_id = %(worker_id)s AND attempts = %(attempts)s
RETURNING id;

-- name: complete_prompt --
-- Mark a held prompt done (in the transaction that writes its results) and lock it until commit.
UPDATE prompts
SET status = 'done', worker_id = NULL, lease_expires_at = NULL, last_error = NULL, finished_at = now()
WHERE id = %(prompt_id)s AND status = 'running' AND worker_id = %(worker_id)s AND attempts = %(attempts)s
RETURNING id;

-- name: prompt_retrievals --
-- A prompt's retrieved memories by rank; key and content are NULL where the memory does not exist.
SELECT memory_retrievals.memory_id, memory_retrievals.rank, memories.id IS NOT NULL AS memory_exists,
       memories.key, memories.content
FROM memory_retrievals
LEFT JOIN memories ON memories.id = memory_retrievals.memory_id
WHERE memory_retrievals.prompt_id = %(prompt_id)s
ORDER BY memory_retrievals.rank, memory_retrievals.memory_id;

-- name: submit_prompt --
-- Queue a prompt with its retrieved memories (in rank order) through icl_submit().
SELECT icl_submit(%(messages)s::jsonb, %(memory_ids)s::bigint[], %(text)s, %(session_id)s::uuid, %(priority)s::integer);

-- name: queue_counts --
-- How many prompts are in each status.
SELECT status, count(*) AS prompts FROM prompts GROUP BY status ORDER BY status;

-- name: last_errors --
-- The most recent failed or retried prompts with their error text, newest first.
SELECT id, status, attempts, last_error, coalesce(finished_at, started_at, created_at) AS at
FROM prompts
WHERE last_error IS NOT NULL
ORDER BY coalesce(finished_at, started_at, created_at) DESC, id DESC
LIMIT %(limit)s;

-- name: listen_prompts --
-- Subscribe to the notification that the prompts trigger and icl_submit() send with a new prompt's id.
LISTEN icl_prompts;
