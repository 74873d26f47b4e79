"""What the command line says about a database it cannot use: a malformed URL, another database's URL, no schema.

Every command runs as a user runs it, `python -m icldaemon ...`, and must end in one line, never a traceback.
"""

import os
import subprocess
import sys

import pytest

PASSWORD = "s3cret-pw"
NOT_A_NUMBER_PORT = f"postgresql://icld:{PASSWORD}@127.0.0.1:notaport/icld"
NOT_A_URL = f"icld:{PASSWORD} at 127.0.0.1"
MYSQL = f"mysql://icld:{PASSWORD}@127.0.0.1:5432/icld"
EXPECTED_FORMS = ("expected postgresql://user[:password]@host[:port]/database "
                  "(or postgres://, either optionally +psycopg)")
SCHEMA_HINT = "has no icldaemon schema (or is behind): run `icldaemon migrate`"


def icldaemon(*arguments: str, url: str, tmp_path, **environment: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ICLD_DATABASE_URL": url, "ICLD_DATA_DIR": str(tmp_path / "data"), "ICLD_LOG_FORMAT": "json",
           "HF_HUB_OFFLINE": "1", **environment}
    return subprocess.run([sys.executable, "-m", "icldaemon", *arguments], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)


def the_one_line(result: subprocess.CompletedProcess) -> str:
    """The error, printed once: one line on stderr (no log line repeating it), no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("icldaemon: ")
    return lines[0]


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("cheese => fromage\nbread =>", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("command", "url", "reason"),
    [
        (["status"], NOT_A_NUMBER_PORT, "its port is not a number"),
        (["submit", "--text-file", "prompt.txt"], NOT_A_URL, "it is not of the form scheme://..."),
        (["plot", "1"], NOT_A_NUMBER_PORT, "its port is not a number"),
        (["adapters"], NOT_A_URL, "it is not of the form scheme://..."),
        (["consolidate", "--memory-id", "1"], NOT_A_NUMBER_PORT, "its port is not a number"),
        (["memories", "list"], NOT_A_URL, "it is not of the form scheme://..."),
        (["runs"], NOT_A_NUMBER_PORT, "its port is not a number"),
        (["migrate"], NOT_A_URL, "it is not of the form scheme://..."),
    ],
)
def test_a_malformed_database_url_is_one_line_naming_the_variable(tmp_path, prompt_file, command, url, reason):
    result = icldaemon(*command, url=url, tmp_path=tmp_path)

    assert result.returncode == 1
    assert the_one_line(result) == f"icldaemon: ICLD_DATABASE_URL cannot be parsed ({reason}); {EXPECTED_FORMS}"
    assert PASSWORD not in result.stderr


@pytest.mark.parametrize("command", [["status"], ["migrate"], ["memories", "add", "--key", "pet", "--content", "a"]])
def test_another_databases_url_is_refused_by_its_scheme_before_connecting(tmp_path, command):
    result = icldaemon(*command, url=MYSQL, tmp_path=tmp_path)

    assert result.returncode == 1
    assert the_one_line(result) == (f"icldaemon: ICLD_DATABASE_URL has the scheme 'mysql://'; icldaemon runs on "
                                    f"PostgreSQL only: {EXPECTED_FORMS}")
    assert PASSWORD not in result.stderr


def test_postgres_and_psycopg_schemes_are_accepted(tmp_path, database_url):
    for scheme in ("postgres://", "postgres+psycopg://", "postgresql+psycopg://"):
        result = icldaemon("status", url=database_url.replace("postgresql://", scheme, 1), tmp_path=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()[:2] == ["queued", "0"]


@pytest.mark.parametrize(
    ("command", "action"),
    [
        (["status"], "counting prompts"),
        (["submit", "--text-file", "prompt.txt"], "submitting a prompt"),
        (["plot", "1"], "reading measurement run 1"),
        (["adapters"], "listing adapters"),
        (["memories", "list"], "listing memories"),
        (["memories", "add", "--key", "pet", "--content", "A cat called Miso."], "storing memory 'pet'"),
        (["runs"], "listing measurement runs"),
    ],
)
def test_an_unmigrated_database_says_to_run_migrate(tmp_path, prompt_file, empty_database_url, command, action):
    database = empty_database_url.rsplit("/", 1)[1]

    result = icldaemon(*command, url=empty_database_url, tmp_path=tmp_path)

    assert result.returncode == 1
    line = the_one_line(result)
    assert line.startswith(f"icldaemon: {action} failed: the database '{database}' on 127.0.0.1:5432 {SCHEMA_HINT} (")
    assert "does not exist" in line


def test_after_migrate_the_same_command_works(tmp_path, empty_database_url):
    assert icldaemon("status", url=empty_database_url, tmp_path=tmp_path).returncode == 1

    migrated = icldaemon("migrate", url=empty_database_url, tmp_path=tmp_path)
    status = icldaemon("status", url=empty_database_url, tmp_path=tmp_path)

    assert migrated.returncode == 0, migrated.stderr
    assert status.returncode == 0, status.stderr


def test_an_error_from_the_database_is_printed_once_in_either_log_format(tmp_path, database_url):
    for log_format in ("json", "console"):
        result = icldaemon("plot", "424242", url=database_url, tmp_path=tmp_path, ICLD_LOG_FORMAT=log_format)

        assert result.returncode == 1
        assert the_one_line(result) == "icldaemon: measurement run 424242 does not exist"
