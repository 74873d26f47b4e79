import json
import os
import select
import signal
import subprocess
import sys

import psycopg
import pytest
import structlog

from icldaemon.settings import Settings
from icldaemon.store import migrate
from icldaemon.store.database import database_url, psql_command


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


# --- `icldaemon db`: the embedded database held up for psql


def start_icldaemon(tmp_path, *arguments: str, **popen) -> subprocess.Popen:
    environment = {key: value for key, value in os.environ.items() if key != "ICLD_DATABASE_URL"}
    environment.update({"ICLD_DATA_DIR": str(tmp_path / "data"), "ICLD_LOG_FORMAT": "json"})
    return subprocess.Popen([sys.executable, "-m", "icldaemon", *arguments], text=True, cwd=tmp_path,
                            env=environment, **popen)


def first_line(stream, seconds: float) -> str:
    ready, _, _ = select.select([stream], [], [], seconds)
    assert ready, f"nothing within {seconds} s"
    return stream.readline()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_icldaemon_db_holds_the_embedded_database_up_until_stopped(tmp_path, stop):
    pgdata = tmp_path / "data" / "pgdata"
    with start_icldaemon(tmp_path, "db", stdout=subprocess.PIPE, stderr=subprocess.PIPE) as held:
        try:
            url = first_line(held.stdout, 120).rstrip("\n")
            assert url.startswith("postgresql://postgres@/postgres?host=")

            # psql takes the URL; the schema is there
            psql = subprocess.run([psql_command(), url, "-At", "-c", "SELECT version_num FROM alembic_version"],
                                  capture_output=True, text=True, timeout=60)
            assert (psql.returncode, psql.stdout.strip()) == (0, migrate.head()), psql.stderr
            with psycopg.connect(url) as connection:
                assert connection.execute("SELECT count(*) FROM memories").fetchone() == (0,)
            # another command joins the server, and leaves it up when it ends
            with start_icldaemon(tmp_path, "memories", "add", "--key", "pet", "--content", "A cat.",
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as added:
                assert added.wait(timeout=120) == 0
            with psycopg.connect(url) as connection:
                assert connection.execute("SELECT key FROM memories").fetchall() == [("pet",)]

            held.send_signal(stop)
            assert held.wait(timeout=60) == 0
        finally:
            if held.poll() is None:
                held.kill()
        stderr, rest = held.stderr.read(), held.stdout.read()
    assert "until Ctrl-C or SIGTERM" in stderr and f"{signal.Signals(stop).name}: releasing the embedded database" in stderr
    assert "Traceback" not in stderr
    assert rest == ""  # the URL was the only line
    assert not (pgdata / "postmaster.pid").exists()
