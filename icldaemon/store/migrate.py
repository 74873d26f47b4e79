"""Schema migrations: Alembic, configured in code.

The revisions live inside the package (icldaemon/store/migrations/), not in a top-level migrations/
directory next to an alembic.ini: a wheel installs only the package, and the daemon must be able to
migrate its database wherever it is installed. Locating them relative to this file works the same
from a source checkout, an editable install and a wheel.
"""

import zlib
from collections.abc import Callable
from pathlib import Path

import psycopg

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from icldaemon.exceptions import DatabaseError
from icldaemon.store.database import create_unpooled_engine_for, describe_url, translate_errors
from icldaemon.store.partitions import is_partition

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# The advisory lock every migration holds for its transaction: daemons that start together migrate one
# after the other, and the later ones find the schema at head and change nothing.
MIGRATION_LOCK = zlib.crc32(b"icldaemon schema migration")


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration without an alembic.ini; env.py migrates over `connection` when given."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def include_name(name: str | None, type_: str, parent_names: dict) -> bool:
    """Autogenerate's filter: partitions are made at run time, not by the models, so they are not compared."""
    return not (type_ == "table" and name is not None and is_partition(name))


def head() -> str:
    """The newest revision the package ships."""
    revision = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert revision is not None, f"no revisions in {MIGRATIONS_DIR}"
    return revision


def _insufficient_privilege(exc: BaseException) -> bool:
    original = exc.orig if isinstance(exc, DBAPIError) else exc
    return isinstance(original, (psycopg.errors.InsufficientPrivilege, psycopg.errors.ReadOnlySqlTransaction))


def _run(url: str, action: str, alembic_command: Callable[[Config], None]) -> None:
    # One transaction for the whole command: PostgreSQL's DDL is transactional, so a failed
    # migration leaves the schema as it was.
    engine = create_unpooled_engine_for(url)
    try:
        try:
            with translate_errors(url, action), engine.begin() as connection:
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
                try:
                    alembic_command(alembic_config(connection))
                except CommandError as exc:
                    raise DatabaseError(f"{action} failed on {describe_url(url)}: {exc}") from exc
        except DatabaseError as exc:
            if exc.__cause__ is None or not _insufficient_privilege(exc.__cause__):
                raise
            raise DatabaseError(
                f"{action} failed: the {describe_url(url)} is at schema revision {current(url) or 'none'}, and "
                f"this role may not change the schema: run `icldaemon migrate` as the schema's owner"
            ) from exc
    finally:
        engine.dispose()


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at `url` up to `revision`."""
    _run(url, f"upgrading the schema to {revision}", lambda config: command.upgrade(config, revision))


def downgrade(url: str, revision: str = "base") -> None:
    """Migrate the database at `url` down to `revision` (base: no icldaemon tables left)."""
    _run(url, f"downgrading the schema to {revision}", lambda config: command.downgrade(config, revision))


def current(url: str) -> str | None:
    """The revision the database at `url` is at; None when it has never been migrated."""
    engine = create_unpooled_engine_for(url)
    try:
        with translate_errors(url, "reading the schema revision"), engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def _known(revision: str) -> bool:
    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except CommandError:
        return False


def require_head(url: str) -> None:
    """DatabaseError, saying what to do, unless the database at `url` is at this release's newest revision."""
    revision, newest = current(url), head()
    if revision == newest:
        return
    if revision is None:
        state = "has no icldaemon schema: run `icldaemon migrate`"
    elif _known(revision):
        state = f"is at schema revision {revision}, behind this release's {newest}: run `icldaemon migrate`"
    else:
        state = f"is at schema revision {revision}, which this release does not know (its newest is {newest})"
    raise DatabaseError(f"the {describe_url(url)} {state}")
