import datetime
import uuid

import numpy as np
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
SELECT table_name, ordinal_position, column_name, data_type, udt_name, is_nullable, column_default,
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

VIEWS = """
SELECT table_name, view_definition FROM information_schema.views WHERE table_schema = 'public' ORDER BY 1
"""

# how each column is stored: the log's float32 arrays out of line, uncompressed
STORAGE = """
SELECT pg_class.relname, pg_attribute.attname, pg_attribute.attstorage
FROM pg_attribute
JOIN pg_class ON pg_class.oid = pg_attribute.attrelid
WHERE pg_class.relnamespace = 'public'::regnamespace AND pg_class.relkind IN ('r', 'p')
  AND pg_attribute.attnum > 0 AND NOT pg_attribute.attisdropped AND NOT pg_class.relname = ANY(%(not_compared)s)
ORDER BY 1, 2
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
            "views": connection.execute(VIEWS).fetchall(),
            "storage": connection.execute(STORAGE, parameters).fetchall(),
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
        "icl_config",
        "icl_dynamics_layers",
        "icl_dynamics_layers_default",
        "icl_dynamics_layers_y2026m01",
        "icl_dynamics_layers_y2026m02",
        "icl_dynamics_tokens",
        "icl_dynamics_tokens_default",
        "icl_dynamics_tokens_y2026m01",
        "icl_dynamics_tokens_y2026m02",
    }
    assert ("icl_dynamics_log", "v") in schema_objects(empty_database_url)

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


def insert_layer_rows(connection, run_id: int, times: list[str]) -> None:
    """One icl_dynamics_layers row (layer k at times[k]) and one icl_dynamics_tokens row per time, as for run_id."""
    for layer_idx, created_at in enumerate(times):
        connection.execute(
            "INSERT INTO icl_dynamics_layers (run_id, layer_idx, created_at, delta_norm, update_frobenius_norm, "
            "marginal_update_norm, cumulative_update_norm, implicit_learning_rate, bias_update_norm) "
            "VALUES (%s, %s, %s, '{1}', '{1}', '{1}', '{1}', '{1}', '{1}')", (run_id, layer_idx, created_at))
        connection.execute("INSERT INTO icl_dynamics_tokens (run_id, created_at, token_position, token_text, segment, "
                           "memory_id) VALUES (%s, %s, '{3}', '{a}', '{context}', '{NULL}')", (run_id + layer_idx,
                                                                                               created_at))


def test_ensure_partitions_moves_rows_out_of_the_default_partition(database_url):
    with psycopg.connect(database_url) as connection:
        insert_layer_rows(connection, 1, ["2026-03-31 23:59:59+00", "2026-04-01 00:00:00+00", "2026-07-01 00:00:00+00"])

    created = create_monthly_partitions(database_url, datetime.date(2026, 3, 10), months_ahead=2)
    created_again = create_monthly_partitions(database_url, datetime.date(2026, 3, 10), months_ahead=2)

    assert created == [f"icl_dynamics_{table}_y2026m{month:02d}"
                       for month in (3, 4, 5) for table in ("layers", "tokens")]
    assert created_again == []
    with psycopg.connect(database_url) as connection:
        layers = connection.execute(
            "SELECT layer_idx, tableoid::regclass::text FROM icl_dynamics_layers ORDER BY layer_idx").fetchall()
        tokens = connection.execute(
            "SELECT run_id, tableoid::regclass::text FROM icl_dynamics_tokens ORDER BY run_id").fetchall()
        insert_layer_rows(connection, 2, ["now"])
        storage = connection.execute(
            "SELECT DISTINCT attstorage FROM pg_attribute WHERE attrelid = 'icl_dynamics_layers_y2026m03'::regclass "
            "AND attname LIKE '%%_norm'").fetchall()
    assert layers == [(0, "icl_dynamics_layers_y2026m03"), (1, "icl_dynamics_layers_y2026m04"),
                      (2, "icl_dynamics_layers_default")]
    assert tokens == [(1, "icl_dynamics_tokens_y2026m03"), (2, "icl_dynamics_tokens_y2026m04"),
                      (3, "icl_dynamics_tokens_default")]
    assert storage == [("e",)]  # a partition made by maintenance stores the float32 arrays as its table does


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


# --- revision 0007: icl_dynamics_log as float32 arrays per (run, layer) behind a view

OLD_LOG_COLUMNS = ("run_id", "prompt_id", "session_id", "prompt_hash", "model", "layer_idx", "token_idx",
                   "token_position", "token_text", "segment", "memory_id", "delta_norm", "update_frobenius_norm",
                   "marginal_update_norm", "cumulative_update_norm", "implicit_learning_rate", "bias_update_norm",
                   "created_at")
QUANTITIES = slice(11, 17)  # the six quantities among OLD_LOG_COLUMNS


def logged_rows(connection, run_id: int, prompt_id: int, session_id, created_at: str, num_layers: int,
                num_tokens: int, *, seed: int, stride: int = 1, float32: bool = False) -> list[tuple]:
    """Rows as revision 0006's writer wrote them: every (layer, token), NULL where a stride skipped the prefix."""
    rng = np.random.default_rng(seed)
    at = connection.execute("SELECT %s::timestamptz", (created_at,)).fetchone()[0]
    rows = []
    for layer_idx in range(num_layers):
        for token_idx in range(num_tokens):
            measured = token_idx % stride == stride - 1 or token_idx == num_tokens - 1
            values = [float(np.float32(value)) if float32 else float(value) for value in rng.random(6) * 3]
            memory_id = 7 if 1 <= token_idx <= 2 else None
            rows.append((run_id, prompt_id, session_id, f"hash-{run_id}", "tiny", layer_idx, token_idx,
                         token_idx + 2, ["a", " b", "\u00e9", "\n", "cat"][token_idx % 5],
                         "memory:7" if memory_id else "context", memory_id,
                         *(values if measured else [None] * 6), at))
    return rows


def insert_logged_runs(url: str, *, float32: bool = False) -> list[tuple]:
    """At revision 0006: two sessions' prompts and runs, a January partition, and their rows; returns the rows."""
    sessions = [uuid.uuid4(), None]
    with psycopg.connect(url) as connection:
        connection.execute("CREATE TABLE icl_dynamics_log_y2026m01 PARTITION OF icl_dynamics_log "
                           "FOR VALUES FROM ('2026-01-01 00:00:00+00') TO ('2026-02-01 00:00:00+00')")
        connection.execute("INSERT INTO memories (id, content) OVERRIDING SYSTEM VALUE VALUES (7, 'm')")
        rows = []
        for index, (session_id, created_at, num_tokens, stride) in enumerate(
                [(sessions[0], "2026-01-20 10:00:00+00", 5, 1), (sessions[1], "2026-05-02 08:00:00+00", 7, 3)]):
            prompt_id = connection.execute("INSERT INTO prompts (text, session_id, status) VALUES ('x', %s, 'done') "
                                           "RETURNING id", (session_id,)).fetchone()[0]
            run_id = connection.execute(
                "INSERT INTO measurement_runs (prompt_id, model, num_layers, total_tokens, context_tokens, "
                "anchor_tokens, query_position, stride, method_version, created_at) "
                "VALUES (%s, 'tiny', 3, %s, %s, 1, %s, %s, 2, %s) RETURNING id",
                (prompt_id, num_tokens + 2, num_tokens, num_tokens + 1, stride, created_at)).fetchone()[0]
            rows += logged_rows(connection, run_id, prompt_id, session_id, created_at, 3, num_tokens, seed=index,
                                stride=stride, float32=float32)
        with connection.cursor() as cursor:
            cursor.executemany(f"INSERT INTO icl_dynamics_log ({', '.join(OLD_LOG_COLUMNS)}) "
                               f"VALUES ({', '.join(['%s'] * len(OLD_LOG_COLUMNS))})", rows)
    return rows


def read_log(url: str) -> list[tuple]:
    with psycopg.connect(url) as connection:
        return connection.execute(f"SELECT {', '.join(OLD_LOG_COLUMNS)} FROM icl_dynamics_log "
                                  "ORDER BY run_id, layer_idx, token_idx").fetchall()


def as_float32(row: tuple) -> tuple:
    quantities = [None if value is None else float(np.float32(value)) for value in row[QUANTITIES]]
    return (*row[:QUANTITIES.start], *quantities, *row[QUANTITIES.stop:])


def test_revision_0007_converts_the_logged_rows_and_its_downgrade_restores_them(empty_database_url):
    url = empty_database_url
    migrate.upgrade(url, "0006")
    written = insert_logged_runs(url)
    expected = sorted((as_float32(row) for row in written), key=lambda row: (row[0], row[5], row[6]))

    migrate.upgrade(url)
    upgraded = read_log(url)
    with psycopg.connect(url) as connection:
        layers = connection.execute("SELECT run_id, count(*), min(tableoid::regclass::text) FROM icl_dynamics_layers "
                                    "GROUP BY run_id ORDER BY run_id").fetchall()
        tokens = connection.execute("SELECT run_id, tableoid::regclass::text FROM icl_dynamics_tokens "
                                    "ORDER BY run_id").fetchall()
    migrate.downgrade(url, "0006")
    restored = read_log(url)
    with psycopg.connect(url) as connection:
        placement = connection.execute("SELECT DISTINCT run_id, tableoid::regclass::text FROM icl_dynamics_log "
                                       "ORDER BY run_id").fetchall()
    migrate.upgrade(url)

    # the same rows, each quantity rounded once to float32; the run's columns from measurement_runs and prompts
    assert upgraded == expected
    run_ids = [run_id for run_id, *_ in layers]
    assert layers == [(run_ids[0], 3, "icl_dynamics_layers_y2026m01"), (run_ids[1], 3, "icl_dynamics_layers_default")]
    assert tokens == [(run_ids[0], "icl_dynamics_tokens_y2026m01"), (run_ids[1], "icl_dynamics_tokens_default")]
    assert restored == expected
    assert placement == [(run_ids[0], "icl_dynamics_log_y2026m01"), (run_ids[1], "icl_dynamics_log_default")]
    assert read_log(url) == expected


def test_run_layers_answers_as_revision_0005_defined_it(empty_database_url):
    """On float32 values, which either layout holds exactly, revision 0007's run_layers equals revision 0006's."""
    url = empty_database_url
    migrate.upgrade(url, "0006")
    rows = insert_logged_runs(url, float32=True)
    with psycopg.connect(url) as connection:
        # edge cases: a layer never measured (no row in run_layers), a layer whose last measured token lacks
        # its bias and path length, a layer whose norm never settles
        run_id = rows[-1][0]
        connection.execute("UPDATE icl_dynamics_log SET update_frobenius_norm = NULL "
                           "WHERE run_id = %s AND layer_idx = 0", (run_id,))
        connection.execute("UPDATE icl_dynamics_log SET bias_update_norm = NULL, cumulative_update_norm = NULL "
                           "WHERE run_id = %s AND layer_idx = 1 AND token_idx = 6", (run_id,))
        connection.execute("UPDATE icl_dynamics_log SET update_frobenius_norm = token_idx + 1 "
                           "WHERE run_id = %s AND layer_idx = 2 AND update_frobenius_norm IS NOT NULL", (run_id,))
        before = connection.execute("SELECT * FROM icl_analytics.run_layers ORDER BY run_id, layer_idx").fetchall()
        columns_before = [(column.name, column.type_code) for column in connection.execute(
            "SELECT * FROM icl_analytics.run_layers LIMIT 0").description]

    migrate.upgrade(url)
    with psycopg.connect(url) as connection:
        after = connection.execute("SELECT * FROM icl_analytics.run_layers ORDER BY run_id, layer_idx").fetchall()
        columns_after = [(column.name, column.type_code) for column in connection.execute(
            "SELECT * FROM icl_analytics.run_layers LIMIT 0").description]
        one_run = connection.execute("SELECT * FROM icl_analytics.run_layers WHERE run_id = %s ORDER BY layer_idx",
                                     (after[0][0],)).fetchall()

    assert len(before) == 5 and columns_after == columns_before
    assert after == before
    assert one_run == before[:3]


def test_revision_0007_refuses_rows_the_writer_never_writes_and_changes_nothing(empty_database_url):
    url = empty_database_url
    migrate.upgrade(url, "0006")
    with psycopg.connect(url) as connection:
        # run 5's layer 1 lacks token 1; run 6's layer 0 repeats token 0
        connection.execute("INSERT INTO icl_dynamics_log (run_id, layer_idx, token_idx) VALUES "
                           "(5, 0, 0), (5, 0, 1), (5, 1, 0), (6, 0, 0), (6, 0, 0), (8, 0, 0)")

    with pytest.raises(DatabaseError, match=r"runs 5, 6\)"):
        migrate.upgrade(url)

    assert migrate.current(url) == "0006"
    with psycopg.connect(url) as connection:
        assert connection.execute("SELECT count(*) FROM icl_dynamics_log").fetchone() == (6,)
