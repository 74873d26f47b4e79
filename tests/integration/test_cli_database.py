"""What the command line says about a database it cannot use: a malformed URL, another database's URL, an
unreachable server, no schema.

Every command that takes a database runs as a user runs it, `python -m icldaemon ...`, against each fault, and must
end within FAIL_WITHIN seconds in one line on stderr naming the problem, nothing on stdout, never a traceback.
"""

import argparse
import os
import socket
import subprocess
import sys
import time

import psycopg
import pytest

from icldaemon.cli import build_parser

PASSWORD = "s3cret-pw"
NOT_A_NUMBER_PORT = f"postgresql://icld:{PASSWORD}@127.0.0.1:notaport/icld"
NOT_A_URL = f"icld:{PASSWORD} at 127.0.0.1"
MYSQL = f"mysql://icld:{PASSWORD}@127.0.0.1:5432/icld"
EXPECTED_FORMS = ("expected postgresql://user[:password]@host[:port]/database "
                  "(or postgres://, either optionally +psycopg)")
SCHEMA_HINT = "has no icldaemon schema (or is behind): run `icldaemon migrate`"
FAIL_WITHIN = 10.0  # seconds, process start included

# Every command that takes a database, with arguments that reach it.
DATABASE_COMMANDS = {
    "migrate": ["migrate"],
    "db": ["db"],
    "run": ["run", "--once"],
    "submit": ["submit", "--text-file", "prompt.txt"],
    "status": ["status"],
    "memories add": ["memories", "add", "--key", "pet", "--content", "A cat called Miso."],
    "memories list": ["memories", "list"],
    "runs": ["runs"],
    "query": ["query", "least_exact_runs", "-v", "since=2000-01-01", "-v", "limit=1"],
    "consolidate": ["consolidate", "--memory-id", "1"],
    "adapters": ["adapters"],
    "generate": ["generate", "--adapter", "1", "--text-file", "prompt.txt"],
    "plot": ["plot", "1"],
    "roles": ["roles"],
    "learn": ["learn", "--memory-id", "1"],
    "export": ["export", "--adapter", "1", "--merged", "merged-model"],
}
# On a database without the schema, `migrate` creates it and `run` upgrades it first unless told not to.
UNMIGRATED_COMMANDS = {name: (["run", "--once", "--no-migrate"] if name == "run" else command)
                       for name, command in DATABASE_COMMANDS.items() if name != "migrate"}


def icldaemon(*arguments: str, url: str, tmp_path, **environment: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ICLD_DATABASE_URL": url, "ICLD_DATA_DIR": str(tmp_path / "data"), "ICLD_LOG_FORMAT": "json",
           "HF_HUB_OFFLINE": "1", **environment}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "icldaemon", *arguments], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=300)
    result.seconds = time.monotonic() - started
    return result


def the_one_line(result: subprocess.CompletedProcess) -> str:
    """The error, printed once and soon: one line on stderr (no log line repeating it), no traceback, no output."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("icldaemon: ")
    assert result.returncode == 1 and result.stdout == ""
    assert result.seconds < FAIL_WITHIN, (result.seconds, lines[0])
    return lines[0]


def command_names(parser: argparse.ArgumentParser, prefix: str = "") -> set[str]:
    """Every command of the parser, "memories add" for a command's own commands."""
    groups = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if not groups:
        return {prefix.strip()}
    return {name for group in groups for command, subparser in group.choices.items()
            for name in command_names(subparser, f"{prefix}{command} ")}


def test_every_command_that_takes_a_database_is_checked_here():
    assert command_names(build_parser()) - {"measure"} == set(DATABASE_COMMANDS)  # measure needs no database


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("cheese => fromage\nbread =>", encoding="utf-8")
    return path


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(("command", "malformed"),
                         [(command, (NOT_A_NUMBER_PORT, NOT_A_URL)[index % 2])
                          for index, command in enumerate(DATABASE_COMMANDS.values())], ids=DATABASE_COMMANDS)
def test_a_malformed_database_url_is_one_line_naming_the_variable(tmp_path, prompt_file, command, malformed):
    reason = "its port is not a number" if malformed == NOT_A_NUMBER_PORT else "it is not of the form scheme://..."

    result = icldaemon(*command, url=malformed, tmp_path=tmp_path)

    assert the_one_line(result) == f"icldaemon: ICLD_DATABASE_URL cannot be parsed ({reason}); {EXPECTED_FORMS}"
    assert PASSWORD not in result.stderr


@pytest.mark.parametrize("command", DATABASE_COMMANDS.values(), ids=DATABASE_COMMANDS)
def test_another_databases_url_is_refused_by_its_scheme_before_connecting(tmp_path, prompt_file, command):
    result = icldaemon(*command, url=MYSQL, tmp_path=tmp_path)

    assert the_one_line(result) == (f"icldaemon: ICLD_DATABASE_URL has the scheme 'mysql://'; icldaemon runs on "
                                    f"PostgreSQL only: {EXPECTED_FORMS}")
    assert PASSWORD not in result.stderr


@pytest.mark.parametrize("command", DATABASE_COMMANDS.values(), ids=DATABASE_COMMANDS)
def test_an_unreachable_server_is_one_line_naming_it(tmp_path, prompt_file, closed_port, command):
    url = f"postgresql://icld:{PASSWORD}@127.0.0.1:{closed_port}/icld"

    result = icldaemon(*command, url=url, tmp_path=tmp_path)

    line = the_one_line(result)
    assert f"failed on database 'icld' on 127.0.0.1:{closed_port}: connection failed: " in line
    assert line.endswith(f"port {closed_port} failed: Connection refused")
    assert PASSWORD not in result.stderr


def test_postgres_and_psycopg_schemes_are_accepted(tmp_path, database_url):
    for scheme in ("postgres://", "postgres+psycopg://", "postgresql+psycopg://"):
        result = icldaemon("status", url=database_url.replace("postgresql://", scheme, 1), tmp_path=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()[:2] == ["queued", "0"]


# What each command was doing when it met the missing schema; the others check the revision before they start.
ACTIONS = {
    "status": "counting prompts", "submit": "submitting a prompt", "plot": "reading measurement run 1",
    "adapters": "listing adapters", "memories list": "listing memories", "memories add": "storing memory 'pet'",
    "runs": "listing measurement runs", "generate": "reading adapter 1", "roles": "creating roles and grants",
    "query": "running query least_exact_runs", "export": "reading adapter 1",
}


@pytest.mark.parametrize("name", UNMIGRATED_COMMANDS)
def test_an_unmigrated_database_says_to_run_migrate(tmp_path, prompt_file, empty_database_url, name):
    database = empty_database_url.rsplit("/", 1)[1]

    result = icldaemon(*UNMIGRATED_COMMANDS[name], url=empty_database_url, tmp_path=tmp_path)

    line = the_one_line(result)
    if name in ACTIONS:
        assert line.startswith(f"icldaemon: {ACTIONS[name]} failed: the database '{database}' on 127.0.0.1:5432 "
                               f"{SCHEMA_HINT} (")
        assert "does not exist" in line
    else:  # checked before the model loads
        assert line == (f"icldaemon: the database '{database}' on 127.0.0.1:5432 has no icldaemon schema: run "
                        "`icldaemon migrate`")


def test_a_database_behind_the_release_says_to_run_migrate(tmp_path, empty_database_url):
    from icldaemon.store import migrate

    migrate.upgrade(empty_database_url, "0005")

    result = icldaemon("run", "--once", "--no-migrate", url=empty_database_url, tmp_path=tmp_path)

    assert the_one_line(result).endswith(f"is at schema revision 0005, behind this release's {migrate.head()}: run "
                                         "`icldaemon migrate`")


def test_db_with_a_configured_database_prints_its_url_for_psql(tmp_path, database_url):
    configured = database_url.replace("postgresql://", "postgresql+psycopg://", 1)

    result = icldaemon("db", url=configured, tmp_path=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout == database_url + "\n"  # libpq's scheme, as psql takes it
    with psycopg.connect(result.stdout.strip()) as connection:
        assert connection.execute("SELECT count(*) FROM memories").fetchone() == (0,)


def test_after_migrate_the_same_command_works(tmp_path, empty_database_url):
    assert icldaemon("status", url=empty_database_url, tmp_path=tmp_path).returncode == 1

    migrated = icldaemon("migrate", url=empty_database_url, tmp_path=tmp_path)
    status = icldaemon("status", url=empty_database_url, tmp_path=tmp_path)

    assert migrated.returncode == 0, migrated.stderr
    assert status.returncode == 0, status.stderr


def test_an_error_from_the_database_is_printed_once_in_either_log_format(tmp_path, database_url):
    for log_format in ("json", "console"):
        result = icldaemon("plot", "424242", url=database_url, tmp_path=tmp_path, ICLD_LOG_FORMAT=log_format)

        assert the_one_line(result) == "icldaemon: measurement run 424242 does not exist"


# --- refused before connecting: an empty URL, a priority beyond the column's type


@pytest.mark.parametrize("command", DATABASE_COMMANDS.values(), ids=DATABASE_COMMANDS)
def test_an_empty_database_url_is_refused_naming_the_variable_not_read_as_unset(tmp_path, prompt_file, command):
    result = icldaemon(*command, url="", tmp_path=tmp_path)

    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("icldaemon: invalid configuration: ICLD_DATABASE_URL is set but empty: unset it for the "
                             "embedded database, or give a PostgreSQL URL\n")
    assert not (tmp_path / "data").exists()  # no embedded database started in its place


def prompt_priorities(url: str) -> list[int]:
    with psycopg.connect(url) as connection:
        return [row[0] for row in connection.execute("SELECT priority FROM prompts ORDER BY id")]


@pytest.mark.parametrize("priority", ["99999999999", "2147483648", "-2147483649", "high"])
def test_a_priority_beyond_postgresqls_integer_is_refused_naming_the_option_and_range(tmp_path, prompt_file,
                                                                                     database_url, priority):
    result = icldaemon("submit", "--text-file", "prompt.txt", "--priority", priority, url=database_url,
                       tmp_path=tmp_path)

    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        f"icldaemon submit: error: argument --priority: expected a whole number from -2147483648 to 2147483647 "
        f"(PostgreSQL's integer), got '{priority}'")
    assert prompt_priorities(database_url) == []


def test_the_ends_of_the_range_pass_the_option():  # what the database then allows is its own limit
    for priority in (2147483647, -2147483648):
        arguments = build_parser().parse_args(["submit", "--text-file", "prompt.txt", "--priority", str(priority)])
        assert arguments.priority == priority


# What a limit on priorities in the database (a CHECK constraint, or icl_submit() refusing a value) says.
PRIORITY_LIMITS = {
    "check_violation": "ALTER TABLE prompts ADD CONSTRAINT priority_limit CHECK (priority <= 100)",
    "invalid_parameter_value": """
        CREATE FUNCTION refuse_priority() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.priority > 100 THEN
                RAISE EXCEPTION 'priority % is above the limit 100', NEW.priority USING ERRCODE = '22023';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_priority BEFORE INSERT ON prompts FOR EACH ROW EXECUTE FUNCTION refuse_priority()""",
}
PRIORITY_LIMIT_MESSAGES = {
    "check_violation": 'new row for relation "prompts" violates check constraint "priority_limit"',
    "invalid_parameter_value": "priority 101 is above the limit 100",
}


@pytest.mark.parametrize("limit", PRIORITY_LIMITS)
def test_a_priority_the_database_refuses_is_its_own_message_not_a_missing_schema(tmp_path, prompt_file, database_url,
                                                                                limit):
    database = database_url.rsplit("/", 1)[1]
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute(PRIORITY_LIMITS[limit])

    result = icldaemon("submit", "--text-file", "prompt.txt", "--priority", "101", url=database_url, tmp_path=tmp_path)

    assert the_one_line(result) == (f"icldaemon: submitting a prompt failed on database '{database}' on "
                                    f"127.0.0.1:5432: {PRIORITY_LIMIT_MESSAGES[limit]}")
    assert prompt_priorities(database_url) == []
