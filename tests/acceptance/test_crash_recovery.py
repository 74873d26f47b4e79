"""SIGKILL in the middle of a job, over and over: every prompt ends `done` once, with exactly one measurement's rows."""

import random
import time
from pathlib import Path

import psycopg
import pytest
from daemon_processes import (
    STARTUP_TIMEOUT,
    Daemon,
    RawPrompt,
    assert_each_measured_exactly_once,
    insert_prompts,
    wait_for_statuses,
)
from daemon_fixtures import save_tiny_model  # on the path through conftest.py

CRASH_TRIALS = 20
DAEMONS_PER_ROUND = 2
NUM_LAYERS = 6
PROMPTS = 60
LEASE_SECONDS = 3.0  # seconds: a killed daemon's prompt is claimed again soon after
SETTLE_SECONDS = 0.3  # seconds for the server to finish what a killed client had already sent (a COMMIT)
JOB_SECONDS = 0.25  # seconds, roughly, one of these prompts takes here; kills are spread over a few jobs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # more layers and positions than the default tiny model: longer jobs, and a COPY of a few thousand rows
    return save_tiny_model(tmp_path_factory.mktemp("llama-6-layers"), num_hidden_layers=NUM_LAYERS, hidden_size=32,
                           max_positions=2048)


def crash_prompts(count: int) -> list[RawPrompt]:
    rng = random.Random(7)
    facts = [("pet", "The user has a grey cat called Miso."), ("city", "The user lives in Lisbon."),
             ("tea", "The user drinks green tea every morning.")]
    prompts = []
    for index in range(count):
        memories = tuple(rng.sample(facts, index % 3))
        words = " ".join(rng.choice(["cheese", "bread", "water", "sea", "otter", "cat", "=>"]) for _ in range(150))
        prompts.append(RawPrompt(f"prompt {index}: {words}\nanswer:", memories))
    return prompts


def held_by(url: str, worker_id: str) -> list[int]:
    with psycopg.connect(url) as connection:
        return [row[0] for row in connection.execute(
            "SELECT id FROM prompts WHERE status = 'running' AND worker_id = %s", (worker_id,))]


def test_sigkill_mid_job_loses_and_duplicates_nothing(database_url, model_dir, tmp_path):
    prompts = insert_prompts(database_url, crash_prompts(PROMPTS))
    settings = {"lease_seconds": LEASE_SECONDS, "poll_interval": 0.5, "max_attempts": 100}
    rng = random.Random(11)
    killed_mid_job = lost = 0
    for trial in range(0, CRASH_TRIALS, DAEMONS_PER_ROUND):
        # two at a time: while one is killed the other works on, and takes over the dead one's prompt
        daemons = [Daemon(database_url, model_dir, tmp_path / f"trial-{trial + index}", f"trial-{trial + index}",
                          **settings) for index in range(DAEMONS_PER_ROUND)]
        try:
            for daemon in daemons:
                daemon.wait_for("prompt_claimed", STARTUP_TIMEOUT, count=rng.randint(1, 3))
                time.sleep(rng.uniform(0.0, JOB_SECONDS))
                daemon.kill()
                time.sleep(SETTLE_SECONDS)
                killed_mid_job += len(held_by(database_url, daemon.worker_id))
                lost += len(daemon.events("prompt_lost"))
        finally:
            for daemon in daemons:
                daemon.close()

    last = Daemon(database_url, model_dir, tmp_path / "last", "last", **settings)
    try:
        wait_for_statuses(database_url, {"done": PROMPTS}, timeout=180)
        return_code = last.terminate()
    finally:
        last.close()
    lost += len(last.events("prompt_lost"))

    assert return_code == 0, last.output()
    attempts = assert_each_measured_exactly_once(database_url, prompts, NUM_LAYERS)
    # a kill between a claim's commit and the completion's leaves the prompt running, to be claimed again
    # once its lease expires (one more attempt); a kill at any other moment leaves nothing behind. A lease
    # that expired under a live worker (a stalled machine) also costs an attempt, and that worker says so.
    assert sum(attempts.values()) == PROMPTS + killed_mid_job + lost
    assert killed_mid_job >= CRASH_TRIALS * 3 // 4, f"only {killed_mid_job} of {CRASH_TRIALS} kills caught a job"
