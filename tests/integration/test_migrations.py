import datetime

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from icldaemon.exceptions import DatabaseError
from icldaemon.store import migrate
from icldaemon.store.database import create_unpooled_engine_for
from icldaemon.store.models import Base
from icldaemon.store.partitions import ensure_partitions

SCHEMA_OBJECTS = """
SELECT relname, relkind FROM pg_class
WHERE relnamespace = 'public'::regnamespace AND relname NOT LIKE 'alembic_version%'
ORDER BY relname
"""

# --- what a database's schema looks like, partitions and alembic_version left out

NOT_COMPARED = """
SELECT relname FROM pg_class
WHERE relnamespace = 'public'::regnamespace AND (relispartition OR relname = 'alembic_version')
"""

COLUMNS = """
SELECT table_name, ordinal_position, column_name, data_type, is_nullable, column_default,
       is_identity, identity_generation
FROM information_schema.columns
WHERE table_schema = 'public' AND NOT table_name = ANY(%(not_compared)s)
ORDER BY table_name, ordinal_position
"""

CONSTRAINTS = """
SELECT table_constraints.table_name, table_constraints.constraint_name, constraint_type,
       check_clause, update_rule, delete_rule
FROM information_schema.table_constraints
LEFT JOIN information_schema.check_constraints USING (constraint_schema, constraint_name)
LEFT JOIN information_schema.referential_constraints USING (constraint_schema, constraint_name)
WHERE table_constraints.table_schema = 'public' AND NOT table_constraints.table_name = ANY(%(not_compared)s)
  -- NOT NULL shows up as a CHECK named after table OIDs, which differ between databases; columns cover it
  AND NOT (constraint_type = 'CHECK' AND table_constraints.constraint_name LIKE '%%_not_null')
ORDER BY table_constraints.table_name, table_constraints.constraint_name
"""

CONSTRAINT_COLUMNS = """
SELECT table_name, constraint_name, column_name, ordinal_position
FROM information_schema.key_column_usage
WHERE table_schema = 'public' AND NOT table_name = ANY(%(not_compared)s)
ORDER BY table_name, constraint_name, ordinal_position
"""

INDEXES = """
SELECT tablename, indexname, indexdef FROM pg_indexes
WHERE schemaname = 'public' AND NOT tablename = ANY(%(not_compared)s)
ORDER BY tablename, indexname
"""

PARTITION_KEYS = """
SELECT partrelid::regclass::text, pg_get_partkeydef(partrelid) FROM pg_partitioned_table ORDER BY 1
"""


def schema_of(url: str) -> dict[str, list[tuple]]:
    with psycopg.connect(url) as connection:
        not_compared = [name for (name,) in connection.execute(NOT_COMPARED)]
        parameters = {"not_compared": not_compared}
        return {
            "columns": connection.execute(COLUMNS, parameters).fetchall(),
            "constraints": connection.execute(CONSTRAINTS, parameters).fetchall(),
            "constraint_columns": connection.execute(CONSTRAINT_COLUMNS, parameters).fetchall(),
            "indexes": connection.execute(INDEXES, parameters).fetchall(),
            "partition_keys": connection.execute(PARTITION_KEYS).fetchall(),
        }


def schema_objects(url: str) -> list[tuple]:
    with psycopg.connect(url) as connection:
        return connection.execute(SCHEMA_OBJECTS).fetchall()


def create_all(url: str) -> None:
    engine = create_unpooled_engine_for(url)
    try:
        with engine.begin() as connection:
            Base.metadata.create_all(connection)
    finally:
        engine.dispose()


def create_monthly_partitions(url: str, today: datetime.date, months_ahead: int) -> list[str]:
    engine = create_unpooled_engine_for(url)
    try:
        with engine.begin() as connection:
            return ensure_partitions(connection, months_ahead, today=today)
    finally:
        engine.dispose()


# --- migrations


def test_upgrade_downgrade_upgrade(empty_database_url):
    assert migrate.current(empty_database_url) is None

    migrate.upgrade(empty_database_url)
    assert migrate.current(empty_database_url) == migrate.head()
    create_monthly_partitions(empty_database_url, datetime.date(2026, 1, 15), months_ahead=1)
    tables = {name for name, kind in schema_objects(empty_database_url) if kind in ("r", "p")}
    assert tables == {
        "memories",
        "prompts",
        "memory_retrievals",
        "measurement_runs",
        "memory_effects",
        "memory_patches",
        "memory_answer_patches",
        "adapters",
        "adapter_patches",
        "icl_dynamics_log",
        "icl_dynamics_log_default",
        "icl_dynamics_log_y2026m01",
        "icl_dynamics_log_y2026m02",
    }

    migrate.downgrade(empty_database_url)
    assert migrate.current(empty_database_url) is None
    assert schema_objects(empty_database_url) == []

    migrate.upgrade(empty_database_url)
    assert migrate.current(empty_database_url) == migrate.head()


def test_migrated_schema_equals_the_models(database_url, empty_database_url):
    create_all(empty_database_url)

    engine = create_unpooled_engine_for(database_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"include_name": migrate.include_name})
            differences = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert differences == []

    migrated, from_models = schema_of(database_url), schema_of(empty_database_url)
    assert migrated["columns"], "the schema query found nothing to compare"
    for part in migrated:
        assert migrated[part] == from_models[part], part


def test_migrate_reports_an_unreachable_database_without_its_password():
    url = "postgresql://icld:secret-password@127.0.0.1:1/nowhere"

    with pytest.raises(DatabaseError) as raised:
        migrate.upgrade(url)

    message = str(raised.value)
    assert "database 'nowhere' on 127.0.0.1:1" in message
    assert "secret-password" not in message
    assert raised.value.__cause__ is not None


# --- constraints


@pytest.mark.parametrize(
    ("messages", "text", "status"),
    [
        ('[{"role": "user", "content": "hi"}]', "hi", "queued"),
        (None, None, "queued"),
        (None, "hi", "paused"),
    ],
    ids=["both messages and text", "neither messages nor text", "unknown status"],
)
def test_prompts_rejects_bad_rows(database_url, messages, text, status):
    with psycopg.connect(database_url) as connection:
        with pytest.raises(psycopg.errors.CheckViolation):
            connection.execute(
                "INSERT INTO prompts (messages, text, status) VALUES (%s::jsonb, %s, %s)", (messages, text, status)
            )


def test_prompts_accepts_messages_or_text(database_url):
    with psycopg.connect(database_url) as connection:
        connection.execute("INSERT INTO prompts (messages) VALUES (%s::jsonb)", ('[{"role": "user", "content": "a"}]',))
        connection.execute("INSERT INTO prompts (text) VALUES (%s)", ("hi",))
        statuses = connection.execute("SELECT status, priority, attempts FROM prompts").fetchall()

    assert statuses == [("queued", 0, 0), ("queued", 0, 0)]


# --- partitions


def test_ensure_partitions_moves_rows_out_of_the_default_partition(database_url):
    with psycopg.connect(database_url) as connection:
        connection.execute(
            "INSERT INTO icl_dynamics_log (run_id, layer_idx, token_idx, created_at) "
            "VALUES (1, 0, 0, '2026-03-31 23:59:59+00'), (1, 0, 1, '2026-04-01 00:00:00+00'), "
            "(1, 0, 2, '2026-07-01 00:00:00+00')"
        )

    created = create_monthly_partitions(database_url, datetime.date(2026, 3, 10), months_ahead=2)
    created_again = create_monthly_partitions(database_url, datetime.date(2026, 3, 10), months_ahead=2)

    assert created == ["icl_dynamics_log_y2026m03", "icl_dynamics_log_y2026m04", "icl_dynamics_log_y2026m05"]
    assert created_again == []
    with psycopg.connect(database_url) as connection:
        placement = connection.execute(
            "SELECT token_idx, tableoid::regclass::text FROM icl_dynamics_log ORDER BY token_idx"
        ).fetchall()
        connection.execute("INSERT INTO icl_dynamics_log (run_id, layer_idx, token_idx) VALUES (2, 0, 0)")
    assert placement == [
        (0, "icl_dynamics_log_y2026m03"),
        (1, "icl_dynamics_log_y2026m04"),
        (2, "icl_dynamics_log_default"),
    ]


# --- method versions


def test_runs_measured_before_revision_0005_keep_method_version_1(empty_database_url):
    migrate.upgrade(empty_database_url, "0004")
    with psycopg.connect(empty_database_url) as connection:
        prompt_id = connection.execute("INSERT INTO prompts (text) VALUES ('hi') RETURNING id").fetchone()[0]
        connection.execute(
            "INSERT INTO measurement_runs (prompt_id, model, num_layers, total_tokens, context_tokens, anchor_tokens, "
            "query_position, stride) VALUES (%s, 'm', 2, 5, 3, 1, 4, 1)", (prompt_id,))

    migrate.upgrade(empty_database_url)
    with psycopg.connect(empty_database_url) as connection:
        assert connection.execute("SELECT method_version FROM measurement_runs").fetchall() == [(1,)]
        assert connection.execute(
            "SELECT method_version FROM icl_analytics.run_summary").fetchall() == [(1,)]
        # no default: a writer that does not say which definition it measured is refused
        with pytest.raises(psycopg.errors.NotNullViolation):
            connection.execute(
                "INSERT INTO measurement_runs (prompt_id, model, num_layers, total_tokens, context_tokens, "
                "anchor_tokens, query_position, stride) VALUES (%s, 'm', 2, 5, 3, 1, 4, 1)", (prompt_id,))

    migrate.downgrade(empty_database_url, "0004")
    with psycopg.connect(empty_database_url) as connection:
        columns = connection.execute("SELECT column_name FROM information_schema.columns "
                                     "WHERE table_name = 'measurement_runs'").fetchall()
        assert ("method_version",) not in columns
        assert connection.execute("SELECT count(*) FROM icl_analytics.run_summary").fetchone() == (1,)
