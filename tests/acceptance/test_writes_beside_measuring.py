"""A daemon writes prompt n while it measures the next: killed with a write under way, one prompt waiting for the
writer and one being measured, it loses and duplicates nothing, and the prompts it held are measured again."""

import time

import psycopg
from daemon_processes import (
    STARTUP_TIMEOUT,
    Daemon,
    RawPrompt,
    assert_each_measured_exactly_once,
    insert_prompts,
    wait_for_statuses,
)

NUM_LAYERS = 2  # the tiny model's
PROMPTS = 24
KILLS = 3
WRITE_SECONDS = 0.5  # each write made this slow by a trigger: the daemon runs ahead of its writer
LEASE_SECONDS = 3.0  # seconds: a killed daemon's prompts are claimed again soon after
SETTLE_SECONDS = 0.3  # seconds for the server to finish what a killed client had already sent (a COMMIT)
FULL_PIPELINE = 3  # prompts a daemon holds at once at most: one written, one waiting for the writer, one measured

SLOW_WRITES = """
CREATE FUNCTION slow_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_sleep(%(seconds)s);
    RETURN NEW;
END
$$;
CREATE TRIGGER slow_write BEFORE INSERT ON icl_dynamics_tokens FOR EACH ROW EXECUTE FUNCTION slow_write();
"""


def held_by(url: str, worker_id: str) -> int:
    with psycopg.connect(url) as connection:
        return connection.execute("SELECT count(*) FROM prompts WHERE status = 'running' AND worker_id = %s",
                                  (worker_id,)).fetchone()[0]


def wait_until_holding(url: str, daemon: Daemon, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while held_by(url, daemon.worker_id) < count:
        assert time.monotonic() < deadline and daemon.process.poll() is None, daemon.output()
        time.sleep(0.02)


def test_sigkill_with_writes_behind_measuring_loses_and_duplicates_nothing(database_url, tiny_model_dir, tmp_path):
    with psycopg.connect(database_url) as connection:
        connection.execute(SLOW_WRITES.replace("%(seconds)s", str(WRITE_SECONDS)))
    prompts = insert_prompts(database_url, [RawPrompt(f"prompt {index}: cheese => fromage, bread =>")
                                            for index in range(PROMPTS)])
    settings = {"lease_seconds": LEASE_SECONDS, "poll_interval": 0.5, "max_attempts": 100}
    held_at_kill, lost = [], 0
    for trial in range(KILLS):
        daemon = Daemon(database_url, tiny_model_dir, tmp_path / f"trial-{trial}", f"trial-{trial}", **settings)
        try:
            daemon.wait_for("listening", STARTUP_TIMEOUT)
            wait_until_holding(database_url, daemon, FULL_PIPELINE, timeout=60)
            daemon.kill()
            time.sleep(SETTLE_SECONDS)
            held_at_kill.append(held_by(database_url, daemon.worker_id))
            lost += len(daemon.events("prompt_lost"))
        finally:
            daemon.close()

    last = Daemon(database_url, tiny_model_dir, tmp_path / "last", "last", **settings)
    try:
        wait_for_statuses(database_url, {"done": PROMPTS}, timeout=180)
        return_code = last.terminate()
    finally:
        last.close()
    lost += len(last.events("prompt_lost"))

    assert return_code == 0, last.output()
    attempts = assert_each_measured_exactly_once(database_url, prompts, NUM_LAYERS)
    # every prompt a killed daemon held (written but not committed, waiting, or being measured) costs one
    # more attempt and nothing else
    assert sum(attempts.values()) == PROMPTS + sum(held_at_kill) + lost
    # the kills caught the pipeline full: more than the one prompt a daemon measuring alone would hold
    assert max(held_at_kill) >= 2, held_at_kill
