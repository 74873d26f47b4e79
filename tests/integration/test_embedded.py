import json
import subprocess
import sys

import psycopg
import structlog

from icldaemon.settings import Settings
from icldaemon.store import migrate
from icldaemon.store.database import database_url


def dead_pid() -> int:
    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    return int(process.stdout)


def test_embedded_database_starts_migrates_and_stops(tmp_path):
    settings = Settings(database_url=None, data_dir=tmp_path / "data")
    pgdata = settings.pgdata_dir

    with structlog.testing.capture_logs() as logs:
        with database_url(settings) as url:
            migrate.upgrade(url)
            assert migrate.current(url) == migrate.head()
            with psycopg.connect(url) as connection:
                connection.execute("INSERT INTO memories (content) VALUES ('kept across restarts')")
            assert (pgdata / "postmaster.pid").exists()

    assert not (pgdata / "postmaster.pid").exists()
    assert [entry["event"] for entry in logs] == ["embedded_database_started", "embedded_database_stopped"]

    # a process killed while it used the server stays on pgserver's list of users
    (pgdata / ".handle_pids.json").write_text(json.dumps([dead_pid()]))
    with database_url(settings) as url:
        assert migrate.current(url) == migrate.head()
        with psycopg.connect(url) as connection:
            assert connection.execute("SELECT content FROM memories").fetchall() == [("kept across restarts",)]
    assert not (pgdata / "postmaster.pid").exists()


def test_a_configured_url_is_used_as_it_is(tmp_path):
    settings = Settings(database_url="postgresql://someone@db.example:5433/icl", data_dir=tmp_path / "data")

    with database_url(settings) as url:
        assert url == "postgresql://someone@db.example:5433/icl"
    assert not settings.pgdata_dir.exists()
