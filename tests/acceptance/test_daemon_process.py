"""`python -m icldaemon run` as real processes: NOTIFY wakes it, SIGTERM stops it cleanly, two split the work."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from daemon_fixtures import save_tiny_model  # noqa: E402

POLL_INTERVAL = 60.0  # seconds: far longer than any wake-up the tests accept
STARTUP_TIMEOUT = 120.0  # seconds for a daemon to import torch, load the model and LISTEN


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


class Daemon:
    def __init__(self, database_url: str, model_dir: Path, data_dir: Path, worker_id: str):
        environment = {
            **os.environ, "ICLD_DATABASE_URL": database_url, "ICLD_MODEL": str(model_dir), "ICLD_DEVICE": "cpu",
            "ICLD_DATA_DIR": str(data_dir), "ICLD_LOG_FORMAT": "json", "ICLD_POLL_INTERVAL": str(POLL_INTERVAL),
            "ICLD_LEASE_SECONDS": "30",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "icldaemon", "run", "--worker-id", worker_id, "--no-migrate"],
            env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def events(self) -> list[dict]:
        parsed = []
        for line in list(self.lines):
            try:
                parsed.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return parsed

    def wait_for(self, event: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.events():
                if entry.get("event") == event:
                    return entry
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {event!r} event; output:\n{''.join(self.lines)[-4000:]}")

    def terminate(self, timeout: float = 60.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self._reader.join(5)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(5)
        self.process.stdout.close()


def wait_until_done(url: str, count: int, timeout: float) -> float:
    started = time.monotonic()
    with psycopg.connect(url, autocommit=True) as connection:
        while time.monotonic() - started < timeout:
            done = connection.execute("SELECT count(*) FROM prompts WHERE status = 'done'").fetchone()[0]
            if done >= count:
                return time.monotonic() - started
            time.sleep(0.05)
    raise AssertionError(f"fewer than {count} prompts done after {timeout} s")


def test_an_insert_wakes_the_daemon_and_sigterm_exits_0(database_url, tiny_model_dir, tmp_path):
    daemon = Daemon(database_url, tiny_model_dir, tmp_path, "solo")
    try:
        daemon.wait_for("listening", STARTUP_TIMEOUT)
        with psycopg.connect(database_url) as connection:
            connection.execute("INSERT INTO prompts (text) VALUES ('cheese => fromage\nbread =>')")
        seconds = wait_until_done(database_url, 1, timeout=20)
        return_code = daemon.terminate()
    finally:
        daemon.close()

    assert seconds < POLL_INTERVAL / 6, f"woken after {seconds:.1f} s"
    assert return_code == 0, "".join(daemon.lines)[-4000:]
    names = [entry.get("event") for entry in daemon.events()]
    assert {"daemon_started", "prompt_claimed", "run_measured", "daemon_stopping"} <= set(names)
    assert "fromage" not in "".join(daemon.lines)  # the prompt text is never logged


def test_two_daemons_measure_every_prompt_exactly_once(database_url, tiny_model_dir, tmp_path):
    daemons = [Daemon(database_url, tiny_model_dir, tmp_path / name, name) for name in ("left", "right")]
    try:
        for daemon in daemons:
            daemon.wait_for("listening", STARTUP_TIMEOUT)
        with psycopg.connect(database_url) as connection:
            for index in range(30):
                connection.execute("INSERT INTO prompts (text) VALUES (%s)", (f"prompt number {index}: count to ",))
                connection.commit()
        wait_until_done(database_url, 30, timeout=60)
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
