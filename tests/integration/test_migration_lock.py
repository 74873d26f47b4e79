"""Migrations hold an advisory lock: daemons starting together migrate one after the other; a role that
may not change the schema starts on a schema at head and is told in one line when it is behind."""

import threading

import psycopg
import pytest
from alembic.script import ScriptDirectory
from test_roles import as_role

from icldaemon.exceptions import DatabaseError
from icldaemon.store import migrate
from icldaemon.store.roles import READER_ROLE, ensure_roles

STARTING_TOGETHER = 4
NO_DDL_ROLE = "icldaemon_test_no_ddl"  # reads the schema's revision, owns nothing, may create nothing


def ensure_no_ddl_role(url: str) -> None:
    """Cluster-wide, like the roles of test_roles: created when missing, never dropped."""
    with psycopg.connect(url, autocommit=True) as connection:
        if connection.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (NO_DDL_ROLE,)).fetchone() is None:
            connection.execute(f"CREATE ROLE {NO_DDL_ROLE} LOGIN")
        database = connection.info.dbname
        connection.execute(f'GRANT CONNECT ON DATABASE "{database}" TO {NO_DDL_ROLE}')
        connection.execute(f"REVOKE CREATE ON SCHEMA public FROM PUBLIC, {NO_DDL_ROLE}")
        connection.execute(f"GRANT SELECT ON alembic_version TO {NO_DDL_ROLE}")


def test_daemons_starting_together_on_an_empty_database_all_migrate_it(empty_database_url):
    barrier = threading.Barrier(STARTING_TOGETHER)
    errors: list[BaseException] = []

    def start() -> None:
        barrier.wait()
        try:
            migrate.upgrade(empty_database_url)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(STARTING_TOGETHER)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)

    assert errors == []
    assert migrate.current(empty_database_url) == migrate.head()


def test_the_lock_is_held_for_the_migration_and_released_after_it(database_url):
    with psycopg.connect(database_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (migrate.MIGRATION_LOCK,))
        finished = threading.Event()
        upgrade = threading.Thread(target=lambda: (migrate.upgrade(database_url), finished.set()))
        upgrade.start()
        assert not finished.wait(timeout=3), "the migration ran while another held the lock"
        holder.execute("SELECT pg_advisory_unlock(%s)", (migrate.MIGRATION_LOCK,))
        upgrade.join(timeout=120)
    assert finished.is_set()
    with psycopg.connect(database_url) as connection:
        assert connection.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()[0] == 0


@pytest.mark.parametrize("role", [READER_ROLE, NO_DDL_ROLE])
def test_a_role_without_ddl_rights_starts_on_a_schema_at_head(database_url, role):
    ensure_roles(database_url)
    ensure_no_ddl_role(database_url)
    migrate.upgrade(as_role(database_url, role))
    assert migrate.current(database_url) == migrate.head()


@pytest.mark.parametrize("role", [READER_ROLE, NO_DDL_ROLE])
def test_a_role_without_ddl_rights_is_told_in_one_line_when_the_schema_is_behind(database_url, role):
    previous = ScriptDirectory.from_config(migrate.alembic_config()).get_revision(migrate.head()).down_revision
    ensure_roles(database_url)
    migrate.downgrade(database_url, previous)
    ensure_no_ddl_role(database_url)

    with pytest.raises(DatabaseError) as raised:
        migrate.upgrade(as_role(database_url, role))

    message = str(raised.value)
    assert "\n" not in message
    assert f"is at schema revision {previous}" in message
    assert "may not change the schema: run `icldaemon migrate` as the schema's owner" in message
    assert migrate.current(database_url) == previous
