"""The database restarted under running daemons (a fast shutdown, a crash, a restart while idle): they reconnect and finish.

A private PostgreSQL (pgserver, in a temporary directory) is stopped and started here; the shared test
server is never touched.
"""

import shutil
import tempfile
import time
from pathlib import Path

import pytest
from daemon_processes import (
    STARTUP_TIMEOUT,
    Daemon,
    RawPrompt,
    assert_each_measured_exactly_once,
    insert_prompts,
    terminate_all,
    wait_for_statuses,
)

from icldaemon.store import migrate
from icldaemon.store.database import _import_pgserver

DOWNTIME = 1.0  # seconds the server stays down
SETTINGS = {"lease_seconds": 5, "poll_interval": 1, "backoff_seconds": 1}  # the defaults' shape, shorter


class PrivateServer:
    """A pgserver PostgreSQL in its own data directory, to stop and start at will."""

    def __init__(self, pgdata: Path):
        self.pgserver = _import_pgserver()
        self.server = self.pgserver.get_server(pgdata, cleanup_mode="delete")
        self.url = self.server.get_uri()

    def restart(self, mode: str) -> None:
        """Stop with pg_ctl's `mode` (fast: connections cut; immediate: a crash, recovered from the WAL) and start."""
        self.pgserver.pg_ctl(["-w", "-m", mode, "stop"], pgdata=self.server.pgdata, user=self.server.system_user)
        time.sleep(DOWNTIME)
        self.server.ensure_postgres_running()
        assert self.server.get_uri() == self.url

    def close(self) -> None:
        self.server.cleanup()


@pytest.fixture
def private_server():
    # Not under pytest's temporary directory: run as root, pgserver runs PostgreSQL as another user and opens
    # the directories above the data directory to it, and every pytest session that starts closes
    # /tmp/pytest-of-<user> again (mode 700), which would lock the server out of its own data mid-test.
    directory = Path(tempfile.mkdtemp(prefix="icld-restart-"))
    try:
        server = PrivateServer(directory / "pgdata")
        try:
            yield server
        finally:
            server.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def restart_prompts(first: int, count: int) -> list[RawPrompt]:
    facts = (("pet", "The user has a grey cat called Miso."), ("city", "The user lives in Lisbon."))
    return [RawPrompt(f"prompt {index}: " + "cheese => fromage, bread => pain, " * 9 + "water =>",
                      facts[: index % 3]) for index in range(first, first + count)]


def done_count(daemons: list[Daemon]) -> int:
    return sum(len(daemon.events("run_measured")) for daemon in daemons)


def test_daemons_reconnect_after_restarts_and_lose_nothing(private_server, tiny_model_dir, tmp_path):
    url = private_server.url
    migrate.upgrade(url)
    prompts = insert_prompts(url, restart_prompts(0, 150))
    daemons = [Daemon(url, tiny_model_dir, tmp_path / name, name, **SETTINGS) for name in ("left", "right")]
    try:
        for daemon in daemons:
            daemon.wait_for("listening", STARTUP_TIMEOUT)
        measured_before_restart = []
        for mode, after in (("fast", 20), ("immediate", 70)):
            deadline = time.monotonic() + 120
            while done_count(daemons) < after and time.monotonic() < deadline:
                time.sleep(0.02)
            measured_before_restart.append([len(daemon.events("run_measured")) for daemon in daemons])
            private_server.restart(mode)
            assert [daemon.process.poll() for daemon in daemons] == [None, None], [
                daemon.output() for daemon in daemons]
        wait_for_statuses(url, {"done": 150}, timeout=180)

        # a restart while they wait: the next prompts must still wake them, or the poll find them
        private_server.restart("fast")
        measured_before_restart.append([len(daemon.events("run_measured")) for daemon in daemons])
        prompts |= insert_prompts(url, restart_prompts(150, 30))
        wait_for_statuses(url, {"done": 180}, timeout=120)
        alive = [daemon.process.poll() for daemon in daemons]
        return_codes = terminate_all(daemons)
    finally:
        for daemon in daemons:
            daemon.close()

    assert alive == [None, None], [daemon.output() for daemon in daemons]
    assert return_codes == [0, 0], [daemon.output() for daemon in daemons]
    assert_each_measured_exactly_once(url, prompts, num_layers=2)
    for index, daemon in enumerate(daemons):
        # each daemon lost its connections three times and listened again each time; each measured prompts
        # between the crash and the idle restart (after it, one daemon alone may take all 30)
        assert len(daemon.events("listening")) >= 4, daemon.output()
        assert measured_before_restart[2][index] > measured_before_restart[1][index], measured_before_restart
