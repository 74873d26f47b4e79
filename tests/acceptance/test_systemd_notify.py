"""`python -m icldaemon run` under a notify socket, as systemd runs it: READY once listening, the watchdog fed, STOPPING."""

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


def test_the_daemon_sends_ready_once_listening_feeds_the_watchdog_and_says_stopping(
    database_url, tiny_model_dir, tmp_path, notify_socket
):
    receiver, path = notify_socket
    environment = {
        **os.environ, "ICLD_DATABASE_URL": database_url, "ICLD_MODEL": str(tiny_model_dir), "ICLD_DEVICE": "cpu",
        "ICLD_DATA_DIR": str(tmp_path), "ICLD_LOG_FORMAT": "json", "NOTIFY_SOCKET": path,
        "WATCHDOG_USEC": str(WATCHDOG_USEC),
    }
    process = subprocess.Popen([sys.executable, "-m", "icldaemon", "run", "--no-migrate", "--worker-id", "notify"],
                               env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    messages: list[tuple[float, str, float]] = []  # (arrival: monotonic, message, arrival: wall clock)

    def receive_until(done, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline and process.poll() is None:
            try:
                message = receiver.recv(4096).decode()
            except TimeoutError:
                continue
            messages.append((time.monotonic(), message, time.time()))

    def watchdogs_after_ready() -> list[float]:
        ready_at = next((at for at, message, _ in messages if "READY=1" in message.splitlines()), None)
        return [at for at, message, _ in messages if message == "WATCHDOG=1" and ready_at is not None and at > ready_at]

    try:
        receive_until(lambda: len(watchdogs_after_ready()) >= WATCHDOG_MESSAGES, STARTUP_TIMEOUT)
        process.send_signal(signal.SIGTERM)
        receive_until(lambda: any("STOPPING=1" in message for _, message, _ in messages), 30)
        return_code = process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(5)
        process.stdout.close()

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
