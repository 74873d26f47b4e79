import json
import os
import pwd
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest
import structlog

from icldaemon.exceptions import DatabaseError
from icldaemon.settings import Settings
from icldaemon.store import embedded_root, migrate
from icldaemon.store.database import _import_pgserver, database_url, psql_command

AS_ROOT = os.geteuid() == 0
root_only = pytest.mark.skipif(not AS_ROOT, reason="as root only: the server then runs as a system user")


@pytest.fixture
def reachable(tmp_path):
    """A directory for a data directory: as root, one the server's system user can reach (pytest's own
    directories are mode 0700)."""
    if not AS_ROOT:
        yield tmp_path
        return
    directory = Path(tempfile.mkdtemp(prefix="icld-embedded-", dir="/tmp"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def dead_pid() -> int:
    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    return int(process.stdout)


def test_embedded_database_starts_migrates_and_stops(reachable):
    settings = Settings(database_url=None, data_dir=reachable / "data")
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


def start_icldaemon(directory, *arguments: str, **popen) -> subprocess.Popen:
    environment = {key: value for key, value in os.environ.items() if key != "ICLD_DATABASE_URL"}
    environment.update({"ICLD_DATA_DIR": str(directory / "data"), "ICLD_LOG_FORMAT": "json"})
    return subprocess.Popen([sys.executable, "-m", "icldaemon", *arguments], text=True, cwd=directory,
                            env=environment, **popen)


def first_line(stream, seconds: float) -> str:
    ready, _, _ = select.select([stream], [], [], seconds)
    assert ready, f"nothing within {seconds} s"
    return stream.readline()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_icldaemon_db_holds_the_embedded_database_up_until_stopped(reachable, stop):
    pgdata = reachable / "data" / "pgdata"
    with start_icldaemon(reachable, "db", stdout=subprocess.PIPE, stderr=subprocess.PIPE) as held:
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
            with start_icldaemon(reachable, "memories", "add", "--key", "pet", "--content", "A cat.",
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


# --- as root: the server runs as a system user that only root and it can reach


def modes(paths) -> dict:
    return {path: stat.S_IMODE(path.stat().st_mode) for path in paths}


def postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().split()[0])


def process_ids(pid: int) -> dict:
    """The real uid, gid and supplementary groups of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"uid": int(fields["Uid"].split()[0]), "gid": int(fields["Gid"].split()[0]),
            "groups": [int(group) for group in fields["Groups"].split()]}


@root_only
def test_as_root_the_server_is_reachable_by_its_user_alone_and_no_permission_outside_changes(reachable):
    settings = Settings(database_url=None, data_dir=reachable / "data")
    install = Path(_import_pgserver().postgres_server.POSTGRES_BIN_PATH).parent
    watched = [*reachable.parents, reachable, *install.parents, install, install / "bin", install / "lib"]
    before = modes(watched)
    user = pwd.getpwnam(embedded_root.SERVICE_USER)

    with database_url(settings) as url:
        pgdata = settings.pgdata_dir
        with psycopg.connect(url) as connection:
            assert connection.execute("SHOW listen_addresses").fetchone() == ("",)  # no TCP at all
            assert connection.execute("SHOW unix_socket_directories").fetchone() == (str(pgdata),)
            assert connection.execute("SELECT current_setting('is_superuser')").fetchone() == ("on",)
        server_pid = postmaster_pid(pgdata)
        assert (stat.S_IMODE(pgdata.stat().st_mode), pgdata.stat().st_uid) == (0o700, user.pw_uid)
        assert process_ids(server_pid) == {"uid": user.pw_uid, "gid": user.pw_gid, "groups": []}
        # another local user cannot even reach the socket, let alone the superuser behind it
        other = subprocess.run(["psql", url, "-At", "-c", "SELECT 1"], user="nobody", group="nogroup",
                               extra_groups=[], capture_output=True, text=True, timeout=60, cwd="/")
        assert other.returncode != 0 and "Permission denied" in other.stderr
        # used again inside this process: the inner use joins, and leaving it leaves the server up
        with database_url(settings) as inner:
            assert inner == url
        assert postmaster_pid(pgdata) == server_pid

    assert modes(watched) == before


@root_only
def test_as_root_a_data_directory_its_user_cannot_reach_is_refused_with_what_to_do(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    before = modes([*tmp_path.parents, tmp_path, private])

    with pytest.raises(DatabaseError) as refused:
        with database_url(Settings(database_url=None, data_dir=private / "data")):
            pass

    message = str(refused.value)
    assert f"cannot reach {private / 'data' / 'pgdata'}" in message
    assert "ICLD_DATA_DIR" in message and "ICLD_DATABASE_URL" in message and "non-root" in message
    assert modes([*tmp_path.parents, tmp_path, private]) == before
    assert not (private / "data" / "pgdata").exists()


@root_only
def test_as_root_binaries_its_user_cannot_reach_are_copied_beside_the_data_directory(reachable, tmp_path,
                                                                                      monkeypatch):
    pgserver = _import_pgserver()
    # the wheel's tree (pgserver/pginstall beside pgserver.libs) under pytest's own directory, mode 0700: out of
    # the user's reach
    install = Path(pgserver.postgres_server.POSTGRES_BIN_PATH).parent
    hidden = tmp_path / "hidden"
    shutil.copytree(install, hidden / "pgserver" / "pginstall", symlinks=True)
    shutil.copytree(install.parent.parent / "pgserver.libs", hidden / "pgserver.libs", symlinks=True)
    monkeypatch.setattr(pgserver.postgres_server, "POSTGRES_BIN_PATH", hidden / "pgserver" / "pginstall" / "bin")
    settings = Settings(database_url=None, data_dir=reachable / "data")
    before = modes([*hidden.parents, hidden, hidden / "pgserver" / "pginstall" / "bin"])

    with database_url(settings) as url:
        with psycopg.connect(url) as connection:
            assert connection.execute("SELECT 1").fetchone() == (1,)
        executable = Path(os.readlink(f"/proc/{postmaster_pid(settings.pgdata_dir)}/exe"))

    copies = list((reachable / "data").glob(".postgres-*"))
    assert len(copies) == 1 and executable == copies[0] / "pgserver" / "pginstall" / "bin" / "postgres"
    assert modes([*hidden.parents, hidden, hidden / "pgserver" / "pginstall" / "bin"]) == before  # left as it was
