"""`icldaemon roles`: the writer runs the daemon and nothing more, the reader reads all but the raw text and writes
nothing, the submitter submits and follows its own prompts.

Roles are cluster-wide: these tests use the default names, create them when missing, and never drop them,
so that they pass however many times, and beside other test runs, on one server.
"""

import datetime
import os
import subprocess
import sys

import psycopg
import pytest
from analytics_fixtures import as_role, load_tiny
from sqlalchemy.engine import make_url

from icldaemon.service import Service
from icldaemon.store import migrate
from icldaemon.store.database import create_unpooled_engine_for
from icldaemon.store.partitions import ensure_partitions, partition_name
from icldaemon.store.roles import READER_ROLE, SUBMITTER_ROLE, TEXT_READER_ROLE, WRITER_ROLE, ensure_roles
from icldaemon.worker import Worker


def relations(url: str, schema: str, kinds: str) -> list[str]:
    with psycopg.connect(url) as connection:
        return [name for (name,) in connection.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = %s::regnamespace AND relkind = ANY(%s) "
            "AND NOT relispartition ORDER BY relname", (schema, list(kinds)))]


def owners(url: str) -> dict[str, str]:
    with psycopg.connect(url) as connection:
        return dict(connection.execute("SELECT relname, pg_get_userbyid(relowner) FROM pg_class "
                                       "WHERE relname LIKE 'icl_dynamics_%%' AND relkind IN ('r', 'p')"))


def test_roles_command_twice_changes_nothing_the_second_time(database_url, tmp_path):
    environment = {**os.environ, "ICLD_DATABASE_URL": database_url, "ICLD_DATA_DIR": str(tmp_path),
                   "ICLD_LOG_FORMAT": "json"}

    first, second = (subprocess.run([sys.executable, "-m", "icldaemon", "roles"], env=environment,
                                    capture_output=True, text=True, timeout=120) for _ in range(2))

    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    granted = (f"writer role {WRITER_ROLE}, read-only role {READER_ROLE}, submitter role {SUBMITTER_ROLE}: "
               "privileges granted")
    assert granted in first.stdout
    assert second.stdout.splitlines() == [granted]
    schema_owner = make_url(database_url).username
    assert set(owners(database_url).values()) == {schema_owner}


def test_log_tables_an_earlier_version_gave_the_writer_are_given_back(database_url):
    ensure_roles(database_url)
    with psycopg.connect(database_url) as connection:
        for table in ("icl_dynamics_layers", "icl_dynamics_tokens_default"):
            connection.execute(f"ALTER TABLE {table} OWNER TO {WRITER_ROLE}")

    report = ensure_roles(database_url)

    assert sorted(report.tables_given_back) == ["icl_dynamics_layers", "icl_dynamics_tokens_default"]
    assert WRITER_ROLE not in owners(database_url).values()


def test_the_writer_measures_and_keeps_partitions_but_changes_no_other_table(database_url, tmp_path):
    ensure_roles(database_url, retention_days=90)
    writer_url = as_role(database_url, WRITER_ROLE)
    tiny = load_tiny(tmp_path / "tiny-llama", tmp_path / "models")

    migrate.upgrade(writer_url)  # at head already: what `icldaemon run` does first is allowed
    with psycopg.connect(writer_url) as connection:
        memory_id = connection.execute("INSERT INTO memories (key, content) VALUES ('pet', 'A cat called Miso.') "
                                       "RETURNING id").fetchone()[0]
        connection.execute("SELECT icl_submit(NULL, ARRAY[%s]::bigint[], text => 'What is my cat called?')",
                           (memory_id,))
    engine = create_unpooled_engine_for(writer_url)
    try:
        with engine.begin() as connection:
            ensure_partitions(connection, 0, today=datetime.date(2024, 5, 1))
    finally:
        engine.dispose()
    service = Service(Worker(writer_url, tiny, worker_id="writer"), retention_days=90)
    counts = service.run_once()
    service.maintain_partitions()

    assert counts == {"done": 1}
    with psycopg.connect(database_url) as connection:
        partitions = {name for (name,) in connection.execute(
            "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = 'icl_dynamics_layers'::regclass")}
        rows, effects = connection.execute("SELECT (SELECT count(*) FROM icl_dynamics_log), "
                                           "(SELECT count(*) FROM memory_effects)").fetchone()
    assert partition_name("icl_dynamics_layers", datetime.datetime.now(datetime.UTC).date()) in partitions
    # dropped by the retention, as the writer
    assert partition_name("icl_dynamics_layers", datetime.date(2024, 5, 1)) not in partitions
    assert rows > 0 and effects == 1

    this_month = datetime.datetime.now(datetime.UTC).date().replace(day=1)
    denied = [
        "DROP TABLE prompts",
        "DROP VIEW icl_dynamics_log",
        "DROP TABLE icl_dynamics_layers",
        f"DROP TABLE {partition_name('icl_dynamics_layers', this_month)}",
        "TRUNCATE icl_dynamics_layers",
        "TRUNCATE icl_dynamics_tokens_default",
        "ALTER TABLE icl_dynamics_layers DETACH PARTITION icl_dynamics_layers_default",
        "ALTER TABLE measurement_runs ADD COLUMN note text",
        "DELETE FROM prompts",
        "DELETE FROM memories",
        "DELETE FROM icl_dynamics_layers",
        "TRUNCATE memories",
        "UPDATE alembic_version SET version_num = '0001'",
        "CREATE TABLE mine (a integer)",
        "CREATE FUNCTION mine() RETURNS integer LANGUAGE sql AS 'SELECT 1'",
        "CREATE VIEW icl_analytics.mine AS SELECT 1",
        "CREATE INDEX ON prompts (status)",
        # the functions make only the log's monthly partitions, and drop only months older than the retention
        "SELECT icl_create_log_partition('prompts', '2030-01-01 00:00:00+00')",
        f"SELECT icl_drop_log_partition('{partition_name('icl_dynamics_layers', this_month)}')",
        "SELECT icl_drop_log_partition('prompts')",
        # the retention is the schema owner's
        "UPDATE icl_config SET retention_days = 0.001",
        "INSERT INTO icl_config (id) VALUES (false)",
        # partitions are read and written through their parents only
        f"SELECT count(*) FROM {partition_name('icl_dynamics_layers', this_month)}",
        "INSERT INTO icl_dynamics_tokens_default (run_id, token_position, token_text, segment, memory_id) "
        "VALUES (1, '{1}', '{x}', '{context}', '{NULL}')",
    ]
    with psycopg.connect(writer_url, autocommit=True) as connection:
        for statement in denied:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                connection.execute(statement)
        owned = connection.execute("SELECT count(*) FROM pg_class WHERE relowner = %s::regrole", (WRITER_ROLE,))
        assert owned.fetchone()[0] == 0
        assert connection.execute("SELECT has_schema_privilege('public', 'CREATE')").fetchone()[0] is False
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            connection.execute("SELECT icl_create_log_partition('icl_dynamics_layers', '2030-01-15 00:00:00+00')")


def test_the_reader_reads_every_table_and_view_but_not_the_raw_text_and_writes_nothing(database_url):
    ensure_roles(database_url)
    reader_url = as_role(database_url, READER_ROLE)
    tables = relations(database_url, "public", "rpv")
    views = relations(database_url, "icl_analytics", "v")

    with psycopg.connect(reader_url, autocommit=True) as connection:
        for table in tables:
            connection.execute(f"SELECT count(*) FROM public.{table}")
        for view in views:
            connection.execute(f"SELECT count(*) FROM icl_analytics.{view}")
        connection.execute("SELECT id, session_id, status, last_error FROM prompts")
        connection.execute("SELECT id, key, metadata FROM memories")
        for column in ("prompts.text", "prompts.messages", "memories.content"):
            table = column.split(".")[0]
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                connection.execute(f"SELECT {column} FROM {table}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute("SELECT * FROM prompts")
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            connection.execute("INSERT INTO memories (content) VALUES ('read-only?')")
        # even in a read-write transaction the grants refuse it
        with pytest.raises(psycopg.errors.InsufficientPrivilege), connection.transaction():
            connection.execute("SET TRANSACTION READ WRITE")
            connection.execute("SELECT icl_submit(NULL, text => 'read-only?')")

    assert {"prompts", "icl_dynamics_log", "icl_dynamics_layers", "icl_dynamics_tokens", "measurement_runs",
            "memory_effects", "adapters"} <= set(tables)
    assert {"run_summary", "run_layers", "memory_impact", "memory_ranking", "session_summary", "exactness_hourly",
            "queue"} == set(views)


def test_the_text_reader_role_granted_to_a_login_reads_the_raw_text(database_url):
    ensure_roles(database_url)
    login = "icldaemon_test_analyst"
    with psycopg.connect(database_url, autocommit=True) as connection:
        if connection.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (login,)).fetchone() is None:
            connection.execute(f"CREATE ROLE {login} LOGIN")
        connection.execute(f"GRANT {TEXT_READER_ROLE} TO {login}")
        connection.execute("INSERT INTO memories (key, content) VALUES ('pet', 'A cat called Miso.')")

    with psycopg.connect(as_role(database_url, login)) as connection:
        contents = [content for (content,) in connection.execute("SELECT content FROM memories")]
    assert "A cat called Miso." in contents


def test_the_submitter_submits_and_follows_only_its_own_prompts(database_url):
    ensure_roles(database_url)
    with psycopg.connect(database_url) as connection:  # another application's prompt
        other = connection.execute("SELECT icl_submit(NULL, text => 'not yours')").fetchone()[0]

    with psycopg.connect(as_role(database_url, SUBMITTER_ROLE)) as connection:
        memory_id = connection.execute("INSERT INTO memories (key, content) VALUES ('pet', 'A cat called Miso.') "
                                       "RETURNING id").fetchone()[0]
        submitted = connection.execute("SELECT icl_submit(NULL, ARRAY[%s]::bigint[], text => 'My cat is called?')",
                                       (memory_id,)).fetchone()[0]
        direct = connection.execute("INSERT INTO prompts (text) VALUES ('Directly.') RETURNING id").fetchone()[0]
        connection.execute("INSERT INTO memory_retrievals (prompt_id, memory_id, rank) VALUES (%s, %s, 1)",
                           (direct, memory_id))
        connection.commit()
        own = dict(connection.execute("SELECT id, status FROM icl_own_prompts").fetchall())
    assert own == {submitted: "queued", direct: "queued"} and other not in own

    denied = [
        "SELECT status FROM prompts",
        "SELECT content FROM memories",
        "SELECT * FROM icl_dynamics_log",
        "SELECT * FROM measurement_runs",
        "UPDATE prompts SET priority = 9",
        "DELETE FROM prompts",
        "INSERT INTO prompts (text, status) VALUES ('sneaky', 'done')",
        "INSERT INTO prompts (text, submitted_by) VALUES ('as someone else', 'icldaemon_writer')",
        "CREATE TABLE mine (a integer)",
    ]
    with psycopg.connect(as_role(database_url, SUBMITTER_ROLE), autocommit=True) as connection:
        for statement in denied:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                connection.execute(statement)


def test_the_roles_command_sets_the_retention_and_refuses_one_that_is_not_a_positive_number(database_url, tmp_path):
    environment = {**os.environ, "ICLD_DATABASE_URL": database_url, "ICLD_DATA_DIR": str(tmp_path),
                   "ICLD_LOG_FORMAT": "json"}

    def roles(*arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "icldaemon", "roles", *arguments], env=environment,
                              capture_output=True, text=True, timeout=120)

    kept, refused, unchanged = roles("--retention-days", "45"), roles("--retention-days", "-1"), roles()

    assert kept.returncode == unchanged.returncode == 0, kept.stderr + unchanged.stderr
    assert "retention of the log: 45 days after a month ends" in kept.stdout
    assert refused.returncode != 0 and "--retention-days must be a positive number of days, got -1" in refused.stderr
    with psycopg.connect(database_url) as connection:
        assert connection.execute("SELECT retention_days FROM icl_config").fetchone() == (45.0,)
