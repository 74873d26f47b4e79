"""`python -m icldaemon run` under a notify socket, as systemd runs it: READY once listening, the watchdog fed, STOPPING."""

import contextlib
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from daemon_fixtures import save_tiny_model  # noqa: E402

STARTUP_TIMEOUT = 120.0  # seconds for a daemon to import torch, load the model and LISTEN
WATCHDOG_USEC = 2_000_000  # microseconds: WATCHDOG=1 expected every second
WATCHDOG_MESSAGES = 4  # how many to wait for after READY


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def notify_socket():
    """A unix datagram socket on a short path (sun_path holds 108 bytes); yields (socket, path)."""
    directory = tempfile.mkdtemp(prefix="icld-notify-", dir="/tmp")
    path = os.path.join(directory, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        receiver.settimeout(1.0)
        yield receiver, path
    shutil.rmtree(directory)


@contextlib.contextmanager
def running_daemon(database_url: str, model_dir: Path, data_dir: Path, notify_path: str, worker_id: str):
    """`icldaemon run` under a notify socket with a watchdog of WATCHDOG_USEC; yields (process, its output lines),
    and on leaving kills it if it still runs and reads the rest of its output."""
    environment = {
        **os.environ, "ICLD_DATABASE_URL": database_url, "ICLD_MODEL": str(model_dir), "ICLD_DEVICE": "cpu",
        "ICLD_DATA_DIR": str(data_dir), "ICLD_LOG_FORMAT": "json", "NOTIFY_SOCKET": notify_path,
        "WATCHDOG_USEC": str(WATCHDOG_USEC),
    }
    process = subprocess.Popen([sys.executable, "-m", "icldaemon", "run", "--no-migrate", "--worker-id", worker_id],
                               env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    output = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True, name="output")
    output.start()
    try:
        yield process, lines
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        output.join(5)
        process.stdout.close()


def test_the_daemon_sends_ready_once_listening_feeds_the_watchdog_and_says_stopping(
    database_url, tiny_model_dir, tmp_path, notify_socket
):
    receiver, path = notify_socket
    messages: list[tuple[float, str, float]] = []  # (arrival: monotonic, message, arrival: wall clock)

    def watchdogs_after_ready() -> list[float]:
        ready_at = next((at for at, message, _ in messages if "READY=1" in message.splitlines()), None)
        return [at for at, message, _ in messages if message == "WATCHDOG=1" and ready_at is not None and at > ready_at]

    with running_daemon(database_url, tiny_model_dir, tmp_path, path, "notify") as (process, lines):

        def receive_until(done, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while not done() and time.monotonic() < deadline and process.poll() is None:
                try:
                    message = receiver.recv(4096).decode()
                except TimeoutError:
                    continue
                messages.append((time.monotonic(), message, time.time()))

        receive_until(lambda: len(watchdogs_after_ready()) >= WATCHDOG_MESSAGES, STARTUP_TIMEOUT)
        process.send_signal(signal.SIGTERM)
        receive_until(lambda: any("STOPPING=1" in message for _, message, _ in messages), 30)
        return_code = process.wait(60)

    output = "".join(lines)[-4000:]
    assert return_code == 0, output
    ready = [(message, at) for _, message, at in messages if "READY=1" in message.splitlines()]
    assert [message for message, _ in ready] == ["READY=1\nSTATUS=waiting for prompts"], (messages, output)
    events = [json.loads(line) for line in lines if line.startswith("{")]
    listening_at = next(datetime.datetime.fromisoformat(event["timestamp"]) for event in events
                        if event.get("event") == "listening")
    assert listening_at.timestamp() <= ready[0][1]
    watchdogs = watchdogs_after_ready()
    assert len(watchdogs) >= WATCHDOG_MESSAGES, (messages, output)
    intervals = [later - earlier for earlier, later in zip(watchdogs, watchdogs[1:])]
    # half of WATCHDOG_USEC, give or take the main loop's tick of half a second and a loaded machine
    assert all(0.5 <= interval <= 2.0 for interval in intervals), intervals
    assert messages[-1][1] == "STOPPING=1\nSTATUS=stopping"


def test_the_watchdog_starves_while_a_write_waits_on_a_lock_and_resumes_after(
    database_url, tiny_model_dir, tmp_path, notify_socket
):
    """A job that stops moving (here the writer, blocked by a lock on measurement_runs) stops WATCHDOG=1, so
    systemd's watchdog would fire; once the lock goes, the prompt is written and the feeding resumes."""
    import psycopg

    receiver, path = notify_socket
    watchdogs: list[float] = []

    def status(prompt_id: int) -> str:
        with psycopg.connect(database_url) as connection:
            return connection.execute("SELECT status FROM prompts WHERE id = %s", (prompt_id,)).fetchone()[0]

    lock_seconds = 4 * WATCHDOG_USEC / 1e6
    with running_daemon(database_url, tiny_model_dir, tmp_path, path, "stall") as (process, lines):

        def receive(seconds: float, done=lambda: False) -> None:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and not done() and process.poll() is None:
                try:
                    message = receiver.recv(4096).decode()
                except TimeoutError:
                    continue
                if message == "WATCHDOG=1":
                    watchdogs.append(time.monotonic())

        receive(STARTUP_TIMEOUT, lambda: len(watchdogs) >= 2)
        with psycopg.connect(database_url) as blocker:
            blocker.execute("LOCK TABLE measurement_runs IN ACCESS EXCLUSIVE MODE")  # held until the rollback
            with psycopg.connect(database_url, autocommit=True) as submitter:
                prompt_id = submitter.execute(
                    "SELECT icl_submit(NULL, text => 'Notes: the release checklist is owned by Ana. Who owns it?')"
                ).fetchone()[0]
            locked_at = time.monotonic()
            receive(lock_seconds)
            released_at = time.monotonic()
            blocker.rollback()
        receive(60, lambda: sum(at > released_at for at in watchdogs) >= 2)
        final_status = status(prompt_id)
        process.send_signal(signal.SIGTERM)
        return_code = process.wait(60)

    output = "".join(lines)[-4000:]
    assert return_code == 0, output
    events = [json.loads(line) for line in lines if line.startswith("{")]
    withheld = [event for event in events if event.get("event") == "watchdog_withheld"]
    assert withheld and "write" in withheld[0]["stalled_seconds"], output
    assert any(event.get("event") == "watchdog_resumed" for event in events), output
    # no WATCHDOG=1 for longer than systemd's timeout while the write was stuck: the watchdog would have fired
    during = [locked_at, *[at for at in watchdogs if locked_at <= at <= released_at], released_at]
    assert max(later - earlier for earlier, later in zip(during, during[1:])) > 1.5 * WATCHDOG_USEC / 1e6, watchdogs
    assert sum(at > released_at for at in watchdogs) >= 2 and final_status == "done", (final_status, output)
