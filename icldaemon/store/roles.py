"""Database roles: one the daemon writes with, one read-only for Grafana and analysts.

Roles belong to the whole PostgreSQL cluster, grants to one database. `ensure_roles` creates the two
login roles where they are missing (another process creating them at the same moment is fine) and
applies the grants in the database at `url`; every step can be repeated. Run it as a superuser, or
as the role that owns the schema and runs the migrations: default privileges are recorded for the
role that runs it, so that tables and views of later migrations are granted too.

The writer reads and writes rows, creates tables in `public` only for the monthly partitions of the
log's tables (icl_dynamics_layers and icl_dynamics_tokens, behind the view icl_dynamics_log) and owns
those tables and their partitions (PostgreSQL lets only an owner attach and drop partitions); it
cannot alter or drop any other table, nor change the schema revision. The reader can read every
table and view, and its sessions start read-only.
"""

from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from icldaemon.store.database import translate_errors
from icldaemon.store.queries import load_queries
from icldaemon.store.queue import connect, connection_url

WRITER_ROLE = "icldaemon_writer"
READER_ROLE = "icldaemon_reader"

QUERIES = load_queries()

_WRITER_GRANTS = ("grant_writer_schema", "grant_writer_tables", "revoke_writer_schema_version",
                  "grant_writer_future_tables")
_READER_GRANTS = ("grant_reader_schemas", "grant_reader_tables", "grant_reader_future_objects",
                  "grant_reader_future_schemas")


@dataclass
class RolesReport:
    writer: str
    reader: str
    created: list[str] = field(default_factory=list)
    made_read_only: list[str] = field(default_factory=list)
    tables_given: list[str] = field(default_factory=list)


def _execute(connection: psycopg.Connection, name: str, parameters: dict | None = None, **identifiers):
    query = sql.SQL(QUERIES[name]).format(**identifiers) if identifiers else QUERIES[name]
    return connection.execute(query, parameters)


def _create_role(connection: psycopg.Connection, role: str) -> bool:
    """Create a login role unless it exists; False when it existed (or another session just created it)."""
    if _execute(connection, "role_exists", {"role": role}).fetchone() is not None:
        return False
    try:
        with connection.transaction():
            _execute(connection, "create_login_role", role=sql.Identifier(role))
    except (psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
        # Another session created it between the check and here: roles are cluster-wide.
        return False
    return True


def ensure_roles(url: str, writer: str = WRITER_ROLE, reader: str = READER_ROLE) -> RolesReport:
    """Create the writer and reader roles if missing and grant them their privileges in the database at `url`."""
    report = RolesReport(writer, reader)
    with connect(url) as connection, translate_errors(connection_url(connection), "creating roles and grants"):
        for role in (writer, reader):
            if _create_role(connection, role):
                report.created.append(role)
        if _execute(connection, "role_is_read_only", {"role": reader}).fetchone() is None:
            _execute(connection, "make_role_read_only", role=sql.Identifier(reader))
            report.made_read_only.append(reader)
        roles = {"writer": sql.Identifier(writer), "reader": sql.Identifier(reader)}
        _execute(connection, "grant_connect", database=sql.Identifier(connection.info.dbname), **roles)
        for name in _WRITER_GRANTS:
            _execute(connection, name, writer=roles["writer"])
        for name in _READER_GRANTS:
            _execute(connection, name, reader=roles["reader"])
        for table in _execute(connection, "icl_dynamics_log_tables").fetchall():
            schema_name, table_name, owner = table
            if owner != writer:
                _execute(connection, "give_table_to_writer", table=sql.Identifier(schema_name, table_name),
                         writer=roles["writer"])
                report.tables_given.append(table_name)
        connection.commit()
    return report
