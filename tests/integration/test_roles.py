"""`icldaemon roles`: the writer runs the daemon and nothing more, the reader reads everything and writes nothing.

Roles are cluster-wide: these tests use the default names, create them when missing, and never drop them,
so that they pass however many times, and beside other test runs, on one server.
"""

import datetime
import os
import subprocess
import sys

import psycopg
import pytest
from analytics_fixtures import load_tiny
from sqlalchemy.engine import make_url

from icldaemon.daemon import Worker
from icldaemon.store import migrate
from icldaemon.store.database import create_unpooled_engine_for
from icldaemon.store.partitions import ensure_partitions, partition_name
from icldaemon.store.roles import READER_ROLE, WRITER_ROLE, ensure_roles


def as_role(url: str, role: str) -> str:
    return make_url(url).set(username=role, password=None).render_as_string(hide_password=False)


def relations(url: str, schema: str, kinds: str) -> list[str]:
    with psycopg.connect(url) as connection:
        return [name for (name,) in connection.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = %s::regnamespace AND relkind = ANY(%s) "
            "AND NOT relispartition ORDER BY relname", (schema, list(kinds)))]


def test_roles_command_twice_changes_nothing_the_second_time(database_url, tmp_path):
    environment = {**os.environ, "ICLD_DATABASE_URL": database_url, "ICLD_DATA_DIR": str(tmp_path),
                   "ICLD_LOG_FORMAT": "json"}

    first, second = (subprocess.run([sys.executable, "-m", "icldaemon", "roles"], env=environment,
                                    capture_output=True, text=True, timeout=120) for _ in range(2))

    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert f"writer role {WRITER_ROLE}, read-only role {READER_ROLE}: privileges granted" in first.stdout
    assert ("now owned by icldaemon_writer: icl_dynamics_layers, icl_dynamics_tokens, icl_dynamics_layers_default, "
            "icl_dynamics_tokens_default") in first.stdout
    assert second.stdout.splitlines() == [f"writer role {WRITER_ROLE}, read-only role {READER_ROLE}: privileges granted"]
    with psycopg.connect(database_url) as connection:
        owners = dict(connection.execute("SELECT relname, pg_get_userbyid(relowner) FROM pg_class "
                                         "WHERE relname LIKE 'icl_dynamics_%%' AND relkind IN ('r', 'p')"))
    assert owners == dict.fromkeys(["icl_dynamics_layers", "icl_dynamics_layers_default", "icl_dynamics_tokens",
                                    "icl_dynamics_tokens_default"], WRITER_ROLE)


def test_the_writer_measures_and_keeps_partitions_but_changes_no_other_table(database_url, tmp_path):
    ensure_roles(database_url)
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
    worker = Worker(writer_url, tiny, worker_id="writer", retention_days=90)
    counts = worker.run_once()
    worker.maintain_partitions()

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

    denied = [
        "DROP TABLE prompts",
        "ALTER TABLE measurement_runs ADD COLUMN note text",
        "DELETE FROM prompts",
        "TRUNCATE memories",
        "UPDATE alembic_version SET version_num = '0001'",
        "CREATE VIEW icl_analytics.mine AS SELECT 1",
        "CREATE INDEX ON prompts (status)",
    ]
    with psycopg.connect(writer_url, autocommit=True) as connection:
        for statement in denied:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                connection.execute(statement)


def test_the_reader_reads_every_table_and_view_and_writes_nothing(database_url):
    ensure_roles(database_url)
    reader_url = as_role(database_url, READER_ROLE)
    tables = relations(database_url, "public", "rpv")
    views = relations(database_url, "icl_analytics", "v")

    with psycopg.connect(reader_url, autocommit=True) as connection:
        for table in tables:
            connection.execute(f"SELECT count(*) FROM public.{table}")
        for view in views:
            connection.execute(f"SELECT count(*) FROM icl_analytics.{view}")
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
