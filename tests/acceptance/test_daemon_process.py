"""`python -m icldaemon run` as real processes: NOTIFY wakes it, SIGTERM stops it cleanly, two split the work."""

import json
import os
import subprocess
import sys

import psycopg
from daemon_processes import STARTUP_TIMEOUT, Daemon, wait_for_statuses

POLL_INTERVAL = 60.0  # seconds: far longer than any wake-up the tests accept
SETTINGS = {"poll_interval": POLL_INTERVAL, "lease_seconds": 30}


def test_an_insert_wakes_the_daemon_and_sigterm_exits_0(database_url, tiny_model_dir, tmp_path):
    daemon = Daemon(database_url, tiny_model_dir, tmp_path, "solo", **SETTINGS)
    try:
        daemon.wait_for("listening", STARTUP_TIMEOUT)
        with psycopg.connect(database_url) as connection:
            connection.execute("INSERT INTO prompts (text) VALUES ('cheese => fromage\nbread =>')")
        seconds = wait_for_statuses(database_url, {"done": 1}, timeout=20)
        return_code = daemon.terminate()
    finally:
        daemon.close()

    assert seconds < POLL_INTERVAL / 6, f"woken after {seconds:.1f} s"
    assert return_code == 0, "".join(daemon.lines)[-4000:]
    names = [entry.get("event") for entry in daemon.events()]
    assert {"daemon_started", "prompt_claimed", "run_measured", "daemon_stopping"} <= set(names)
    assert "fromage" not in "".join(daemon.lines)  # the prompt text is never logged


def test_two_daemons_measure_every_prompt_exactly_once(database_url, tiny_model_dir, tmp_path):
    daemons = [Daemon(database_url, tiny_model_dir, tmp_path / name, name, **SETTINGS)
               for name in ("left", "right")]
    try:
        for daemon in daemons:
            daemon.wait_for("listening", STARTUP_TIMEOUT)
        with psycopg.connect(database_url) as connection:
            for index in range(30):
                connection.execute("INSERT INTO prompts (text) VALUES (%s)", (f"prompt number {index}: count to ",))
                connection.commit()
        wait_for_statuses(database_url, {"done": 30}, timeout=60)
        return_codes = [daemon.terminate() for daemon in daemons]
    finally:
        for daemon in daemons:
            daemon.close()

    assert return_codes == [0, 0]
    with psycopg.connect(database_url) as connection:
        runs = connection.execute("SELECT count(*), count(DISTINCT prompt_id) FROM measurement_runs").fetchone()
        statuses = connection.execute("SELECT status, attempts, count(*) FROM prompts GROUP BY 1, 2").fetchall()
        rows, expected = connection.execute(
            "SELECT (SELECT count(*) FROM icl_dynamics_log), "
            "(SELECT sum(num_layers * context_tokens) FROM measurement_runs)").fetchone()
    assert runs == (30, 30)
    assert statuses == [("done", 1, 30)]
    assert rows == expected
    claimed_by = [sum(entry.get("event") == "run_measured" for entry in daemon.events()) for daemon in daemons]
    assert sum(claimed_by) == 30


def test_submit_run_once_and_status_from_the_shell(database_url, tiny_model_dir, tmp_path):
    environment = {**os.environ, "ICLD_DATABASE_URL": database_url, "ICLD_MODEL": str(tiny_model_dir),
                   "ICLD_DEVICE": "cpu", "ICLD_DATA_DIR": str(tmp_path), "ICLD_LOG_FORMAT": "json"}

    def icldaemon(*arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "icldaemon", *arguments], env=environment, capture_output=True,
                              text=True, timeout=STARTUP_TIMEOUT)

    with psycopg.connect(database_url) as connection:
        memory_id = connection.execute("INSERT INTO memories (key, content) VALUES ('pet', 'A cat called Miso.') "
                                       "RETURNING id").fetchone()[0]
    messages = tmp_path / "chat.json"
    messages.write_text(json.dumps([{"role": "user", "content": "What is my cat called?"}]), encoding="utf-8")
    text = tmp_path / "prompt.txt"
    text.write_text("cheese => fromage\nbread =>", encoding="utf-8")

    submitted = icldaemon("submit", "--messages-file", str(messages), "--memory-ids", str(memory_id))
    missing = icldaemon("submit", "--text-file", str(text), "--memory-ids", f"{memory_id},999999")
    assert submitted.returncode == 0, submitted.stderr
    assert missing.returncode == 1 and "memory 999999 does not exist" in missing.stderr
    with psycopg.connect(database_url) as connection:
        connection.execute("INSERT INTO prompts (messages) VALUES ('{\"role\": \"user\"}')")

    ran = icldaemon("run", "--once", "--no-migrate")
    status = icldaemon("status")

    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "1 done, 1 failed"
    assert status.returncode == 0
    lines = status.stdout.splitlines()
    assert [line.split() for line in lines[:4]] == [["queued", "0"], ["running", "0"], ["done", "1"], ["failed", "1"]]
    assert "messages must be a non-empty JSON list" in status.stdout
