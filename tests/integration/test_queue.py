"""The prompt queue on a real PostgreSQL: claims, SKIP LOCKED, leases, retries, submit."""

import time

import psycopg
import pytest

from icldaemon.exceptions import DatabaseError
from icldaemon.store import queue


def insert_prompt(url: str, text: str = "hello", priority: int = 0) -> int:
    with psycopg.connect(url) as connection:
        return connection.execute(
            "INSERT INTO prompts (text, priority) VALUES (%s, %s) RETURNING id", (text, priority)
        ).fetchone()[0]


def prompt_row(url: str, prompt_id: int) -> dict:
    with psycopg.connect(url) as connection, connection.cursor(row_factory=psycopg.rows.dict_row) as cursor:
        return cursor.execute("SELECT * FROM prompts WHERE id = %s", (prompt_id,)).fetchone()


def test_claims_by_priority_then_age_and_sets_the_lease(database_url):
    first = insert_prompt(database_url, "first")
    second = insert_prompt(database_url, "second")
    urgent = insert_prompt(database_url, "urgent", priority=5)

    with queue.connect(database_url) as connection:
        claims = [queue.claim(connection, "w1", lease_seconds=30) for _ in range(4)]

    assert [claim.prompt_id for claim in claims[:3]] == [urgent, first, second]
    assert claims[3] is None
    assert claims[1].text == "first" and claims[1].attempts == 1 and claims[1].worker_id == "w1"
    row = prompt_row(database_url, first)
    assert row["status"] == "running" and row["worker_id"] == "w1" and row["attempts"] == 1
    lease = (row["lease_expires_at"] - row["started_at"]).total_seconds()
    assert lease == pytest.approx(30, abs=0.5)


def test_a_locked_prompt_is_skipped_by_another_connection(database_url):
    first = insert_prompt(database_url, "first")
    second = insert_prompt(database_url, "second")

    with psycopg.connect(database_url) as holder, queue.connect(database_url) as other:
        holder.execute("SELECT id FROM prompts WHERE id = %s FOR UPDATE", (first,))
        claimed = queue.claim(other, "w2")
        assert claimed.prompt_id == second
        assert queue.claim(other, "w2") is None
        holder.rollback()
        assert queue.claim(other, "w2").prompt_id == first


def test_an_expired_lease_is_claimed_again_and_the_first_holder_loses_it(database_url):
    prompt_id = insert_prompt(database_url)

    with queue.connect(database_url) as connection:
        first = queue.claim(connection, "w1", lease_seconds=0.05)
        assert queue.claim(connection, "w2") is None
        time.sleep(0.1)
        second = queue.claim(connection, "w2", lease_seconds=30)
        assert second.prompt_id == prompt_id and second.attempts == 2
        assert not queue.renew_lease(connection, first)
        assert queue.fail(connection, first, "late", retry=False) is None
        with connection.transaction():
            assert not queue.complete(connection, first)
        assert queue.renew_lease(connection, second, lease_seconds=60)
    assert prompt_row(database_url, prompt_id)["worker_id"] == "w2"


def test_renewing_a_lease_keeps_the_prompt(database_url):
    insert_prompt(database_url)
    with queue.connect(database_url) as connection:
        held = queue.claim(connection, "w1", lease_seconds=0.2)
        for _ in range(3):
            time.sleep(0.1)
            assert queue.renew_lease(connection, held, lease_seconds=0.2)
        assert queue.claim(connection, "w2") is None


def test_retries_back_off_then_fail_with_the_error_text(database_url):
    prompt_id = insert_prompt(database_url)

    with queue.connect(database_url) as connection:
        held = queue.claim(connection, "w1")
        assert queue.fail(connection, held, "boom 1", retry=True, max_attempts=3, backoff_base_seconds=0.1) == "queued"
        row = prompt_row(database_url, prompt_id)
        assert row["status"] == "queued" and row["last_error"] == "boom 1" and row["next_attempt_at"] is not None
        assert queue.claim(connection, "w1") is None  # not due yet
        time.sleep(0.15)
        held = queue.claim(connection, "w1")
        assert held.attempts == 2
        assert queue.fail(connection, held, "boom 2", retry=True, max_attempts=3, backoff_base_seconds=0.1) == "queued"
        row = prompt_row(database_url, prompt_id)
        delay = (row["next_attempt_at"] - row["started_at"]).total_seconds()
        assert delay == pytest.approx(0.2, abs=0.05)
        time.sleep(0.25)
        held = queue.claim(connection, "w1")
        assert held.attempts == 3
        assert queue.fail(connection, held, "boom 3", retry=True, max_attempts=3) == "failed"
        assert queue.claim(connection, "w1") is None

    row = prompt_row(database_url, prompt_id)
    assert (row["status"], row["attempts"], row["last_error"]) == ("failed", 3, "boom 3")
    assert row["finished_at"] is not None and row["worker_id"] is None


def test_bad_input_fails_at_once_and_release_does_not_count_the_attempt(database_url):
    bad = insert_prompt(database_url, "bad")
    kept = insert_prompt(database_url, "kept")
    with queue.connect(database_url) as connection:
        held = queue.claim(connection, "w1")
        assert queue.fail(connection, held, "the prompt has 9 tokens; the model's context is 4", retry=False) == "failed"
        held = queue.claim(connection, "w1")
        assert held.prompt_id == kept
        assert queue.release(connection, held)
        again = queue.claim(connection, "w1")
    assert again.prompt_id == kept and again.attempts == 1
    assert prompt_row(database_url, bad)["last_error"] == "the prompt has 9 tokens; the model's context is 4"


def test_submit_inserts_the_prompt_with_its_retrievals_in_rank_order_and_notifies(database_url):
    with psycopg.connect(database_url) as connection:
        memory_ids = [connection.execute("INSERT INTO memories (content) VALUES (%s) RETURNING id", (content,))
                      .fetchone()[0] for content in ("a", "b", "c")]
    with queue.connect(database_url, autocommit=True) as listener, queue.connect(database_url) as connection:
        listener.execute("LISTEN icl_prompts")
        prompt_id = queue.submit(connection, messages=[{"role": "user", "content": "hi"}],
                                 memory_ids=[memory_ids[2], memory_ids[0]], priority=3)
        notified = [notify.payload for notify in listener.notifies(timeout=2.0, stop_after=1)]
        ranks = connection.execute("SELECT memory_id, rank FROM memory_retrievals WHERE prompt_id = %s ORDER BY rank",
                                   (prompt_id,)).fetchall()
        retrieved = queue.retrievals(connection, prompt_id)
    assert notified == [str(prompt_id)]
    assert ranks == [(memory_ids[2], 1), (memory_ids[0], 2)]
    assert [(r.memory_id, r.content) for r in retrieved] == [(memory_ids[2], "c"), (memory_ids[0], "a")]
    assert prompt_row(database_url, prompt_id)["priority"] == 3


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(messages=[{"role": "user", "content": "hi"}], text="hi"), "exactly one of messages and text"),
        (dict(), "exactly one of messages and text"),
        (dict(messages={"role": "user"}), "non-empty JSON array"),
        (dict(messages=[{"role": "user"}]), "every message must be"),
        (dict(text="hi", memory_ids=[987654]), "memory 987654 does not exist"),
    ],
    ids=["both", "neither", "not a list", "no content", "missing memory"],
)
def test_submit_rejects_bad_input_by_name(database_url, arguments, message):
    with queue.connect(database_url) as connection:
        with pytest.raises(DatabaseError, match=message):
            queue.submit(connection, **arguments)
        assert queue.queue_counts(connection) == {}


def test_a_plain_insert_notifies_and_status_reports_counts_and_errors(database_url):
    with queue.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN icl_prompts")
        prompt_id = insert_prompt(database_url)
        assert [n.payload for n in listener.notifies(timeout=2.0, stop_after=1)] == [str(prompt_id)]
    insert_prompt(database_url)
    with queue.connect(database_url) as connection:
        held = queue.claim(connection, "w1")
        queue.fail(connection, held, "no good", retry=False)
        assert queue.queue_counts(connection) == {"failed": 1, "queued": 1}
        errors = queue.last_errors(connection)
    assert [(error["id"], error["last_error"]) for error in errors] == [(prompt_id, "no good")]
