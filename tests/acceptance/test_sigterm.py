"""SIGTERM in the middle of a job: the job finishes within the stop timeout, or goes back to the queue untouched; exit 0."""

import time
from pathlib import Path

import psycopg
import pytest
from daemon_fixtures import save_tiny_model  # on the path through conftest.py
from daemon_processes import STARTUP_TIMEOUT, Daemon, RawPrompt, assert_each_measured_exactly_once, insert_prompts

from icldaemon.service import ABANDON_TIMEOUT, LISTEN_TIMEOUT, MAIN_LOOP_TICK

NUM_LAYERS = 12
# about 4.5 s of measuring on one core here: far longer than the short stop timeout, far shorter than the long one
LONG_PROMPT = RawPrompt("the cat sat on the mat. " * 166)
SHORT_STOP_TIMEOUT = 0.5  # seconds
LONG_STOP_TIMEOUT = 120.0  # seconds
# seconds a stopping daemon may take beyond its stop timeout: its own bounded steps (the main loop's tick, the
# released job leaving the model, the listener's next check) and 10 s for the interpreter's exit on a loaded machine
SHUTDOWN_SECONDS = MAIN_LOOP_TICK + ABANDON_TIMEOUT + 2 * LISTEN_TIMEOUT + 10.0


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("llama-12-layers"), num_hidden_layers=NUM_LAYERS, hidden_size=128,
                           max_positions=4096)


def result_rows(url: str) -> dict[str, int]:
    with psycopg.connect(url) as connection:
        return {table: connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608 - fixed names
                for table in ("measurement_runs", "icl_dynamics_log", "memory_effects", "memory_patches")}


def sigterm_after_claim(url: str, model_dir: Path, data_dir: Path, stop_timeout: float) -> tuple[Daemon, int, float]:
    """Start a daemon, SIGTERM it as soon as it claims the prompt; returns it, its exit code and seconds to exit."""
    daemon = Daemon(url, model_dir, data_dir, data_dir.name, stop_timeout=stop_timeout, poll_interval=60,
                    lease_seconds=60)
    try:
        daemon.wait_for("prompt_claimed", STARTUP_TIMEOUT)
        started = time.monotonic()
        return_code = daemon.terminate(timeout=LONG_STOP_TIMEOUT + 30)
        return daemon, return_code, time.monotonic() - started
    finally:
        daemon.close()


def test_a_job_longer_than_the_stop_timeout_is_released_and_one_within_it_finishes(
    database_url, slow_model_dir, tmp_path
):
    prompts = insert_prompts(database_url, [LONG_PROMPT])
    (prompt_id,) = prompts

    released, return_code, seconds = sigterm_after_claim(database_url, slow_model_dir, tmp_path / "short",
                                                         SHORT_STOP_TIMEOUT)
    with psycopg.connect(database_url) as connection:
        state = connection.execute("SELECT status, attempts, worker_id, lease_expires_at, last_error FROM prompts"
                                   ).fetchone()
    assert return_code == 0, released.output()
    assert state == ("queued", 0, None, None, None)  # back in the queue, the interrupted attempt not counted
    assert result_rows(database_url) == dict.fromkeys(
        ("measurement_runs", "icl_dynamics_log", "memory_effects", "memory_patches"), 0)
    assert released.events("prompt_released")[0]["prompt_id"] == prompt_id
    assert released.events("prompt_abandoned"), released.output()  # the job's thread left the model, then the process
    assert not released.events("run_measured")

    finished, return_code, seconds_finishing = sigterm_after_claim(database_url, slow_model_dir, tmp_path / "long",
                                                                   LONG_STOP_TIMEOUT)
    assert return_code == 0, finished.output()
    assert [entry["event"] for entry in finished.events() if entry["event"] in ("run_measured", "daemon_stopped")] == [
        "run_measured", "daemon_stopped"]
    assert not finished.events("prompt_released")
    assert_each_measured_exactly_once(database_url, prompts, NUM_LAYERS)
    # the job takes longer than the short stop timeout, and the first daemon left within that timeout and
    # the shutdown's own bounded steps (the listener's next check, the released job leaving the model)
    assert finished.events("run_measured")[0]["measure_seconds"] > SHORT_STOP_TIMEOUT * 2
    assert seconds < SHORT_STOP_TIMEOUT + SHUTDOWN_SECONDS, seconds
    assert seconds_finishing < LONG_STOP_TIMEOUT
