"""Database roles: the daemon's writer, a read-only reader for Grafana and analysts, and a submitter for applications.

Roles belong to the whole PostgreSQL cluster, grants to one database. `ensure_roles` creates the
login roles where they are missing (another process creating them at the same moment is fine) and
applies the grants in the database at `url`; every step can be repeated. Run it as a superuser, or
as the role that owns the schema and runs the migrations: default privileges are recorded for the
role that runs it, so that tables and views of later migrations are granted too.

- The **writer** reads and writes rows (it deletes none), owns nothing and creates nothing: the
  monthly partitions of the log's tables are made and dropped by two functions of the schema owner
  (revisions 0008, 0009) that it may only execute, and which make only the log's monthly partitions and
  drop only months older than the retention the owner configured (`icl_config`). It cannot alter, drop
  or truncate any table, nor change the schema revision or the owner's settings. Log tables an earlier
  version gave it are given back to the schema owner.
- The **reader** reads every table and view but no column that holds text or rebuilds it (`TEXT_COLUMNS`:
  the prompts' text and messages, the memories' content, the log's token texts, the prompt hash, the
  model's answers as token ids, the patch vectors); its sessions start read-only. It reads the log's
  partitions only through their parents, where those column grants apply.
- The **submitter** calls `icl_submit` and `icl_put_memory`, inserts memories, prompts and retrievals
  (retrievals only of its own memories into its own prompts: revision 0009's trigger), and reads the
  status of the prompts it submitted (`icl_own_prompts`, a security barrier); nothing else.
- The **text reader** (`icldaemon_text_reader`, no login) may read those columns too: the opt-in for a
  login that needs it (`GRANT icldaemon_text_reader TO alice`).

In the database it also revokes TEMPORARY from PUBLIC (nothing the service runs needs temporary
objects) and, where an older database still grants it, CREATE on schema public from PUBLIC.
"""

from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from icldaemon.exceptions import ConfigurationError
from icldaemon.store.database import translate_errors
from icldaemon.store.queries import QUERIES
from icldaemon.store.queue import connect, connection_url

WRITER_ROLE = "icldaemon_writer"
READER_ROLE = "icldaemon_reader"
SUBMITTER_ROLE = "icldaemon_submitter"
TEXT_READER_ROLE = "icldaemon_text_reader"


_WRITER_GRANTS = ("grant_writer_schema", "grant_writer_functions", "grant_writer_tables",
                  "revoke_writer_schema_version", "grant_writer_future_tables")
_READER_GRANTS = ("grant_reader_schemas", "grant_reader_tables", "grant_reader_future_objects",
                  "grant_reader_future_schemas")
# Columns the reader may not read: text, or numbers from which the text can be rebuilt (a hash of the token ids
# is inverted by trying the vocabulary; answer ids decode to the answer; the patch vectors are hidden states).
TEXT_COLUMNS = {
    "prompts": ("text", "messages"),
    "memories": ("content",),
    "icl_dynamics_tokens": ("token_text",),
    "icl_dynamics_log": ("token_text", "prompt_hash"),
    "measurement_runs": ("prompt_hash",),
    "memory_patches": ("delta", "a_tilde", "bias_delta"),
    "memory_answer_patches": ("answer_ids", "a_tilde", "value"),
}


@dataclass
class RolesReport:
    writer: str
    reader: str
    submitter: str
    created: list[str] = field(default_factory=list)
    made_read_only: list[str] = field(default_factory=list)
    tables_given_back: list[str] = field(default_factory=list)
    public_create_revoked: bool = False
    retention_days: float | None = None


def _execute(connection: psycopg.Connection, name: str, parameters: dict | None = None, **identifiers):
    query = sql.SQL(QUERIES[name]).format(**identifiers) if identifiers else QUERIES[name]
    return connection.execute(query, parameters)


def _create_role(connection: psycopg.Connection, role: str, login: bool = True) -> bool:
    """Create a role unless it exists; False when it existed (or another session just created it)."""
    if _execute(connection, "role_exists", {"role": role}).fetchone() is not None:
        return False
    try:
        with connection.transaction():
            _execute(connection, "create_login_role" if login else "create_group_role", role=sql.Identifier(role))
    except (psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
        # Another session created it between the check and here: roles are cluster-wide.
        return False
    return True


def _grant_reader_columns(connection: psycopg.Connection, reader: sql.Identifier) -> None:
    for relation, hidden in TEXT_COLUMNS.items():
        columns = [name for (name,) in _execute(connection, "relation_columns", {"relation": relation}).fetchall()
                   if name not in hidden]
        _execute(connection, "reader_without_columns", relation=sql.Identifier(relation), reader=reader,
                 columns=sql.SQL(", ").join(map(sql.Identifier, columns)))


def ensure_roles(url: str, writer: str = WRITER_ROLE, reader: str = READER_ROLE,
                 submitter: str = SUBMITTER_ROLE, retention_days: float | None = None) -> RolesReport:
    """Create the roles if missing and grant them their privileges in the database at `url`.

    `retention_days`, when given, becomes the log's retention (icl_config): the days after its month ends
    that a monthly partition is dropped by the daemon's partition maintenance.
    """
    if retention_days is not None and not 0 < retention_days < float("inf"):
        raise ConfigurationError(f"--retention-days must be a positive number of days, got {retention_days}")
    report = RolesReport(writer, reader, submitter)
    with connect(url) as connection, translate_errors(connection_url(connection), "creating roles and grants"):
        for role in (writer, reader, submitter):
            if _create_role(connection, role):
                report.created.append(role)
        if _create_role(connection, TEXT_READER_ROLE, login=False):
            report.created.append(TEXT_READER_ROLE)
        if _execute(connection, "role_is_read_only", {"role": reader}).fetchone() is None:
            _execute(connection, "make_role_read_only", role=sql.Identifier(reader))
            report.made_read_only.append(reader)
        roles = {"writer": sql.Identifier(writer), "reader": sql.Identifier(reader)}
        _execute(connection, "grant_connect", database=sql.Identifier(connection.info.dbname), **roles)
        for name in _WRITER_GRANTS:
            _execute(connection, name, writer=roles["writer"])
        for name in _READER_GRANTS:
            _execute(connection, name, reader=roles["reader"])
        _grant_reader_columns(connection, roles["reader"])
        _execute(connection, "grant_text_reader", text_reader=sql.Identifier(TEXT_READER_ROLE),
                 relations=sql.SQL(", ").join(map(sql.Identifier, TEXT_COLUMNS)))
        database = sql.Identifier(connection.info.dbname)
        _execute(connection, "grant_submitter", submitter=sql.Identifier(submitter), database=database)
        _execute(connection, "revoke_temporary", database=database)
        if _execute(connection, "public_create_granted").fetchone()[0]:
            _execute(connection, "revoke_public_create")
            report.public_create_revoked = True
        (schema_owner,) = _execute(connection, "schema_owner").fetchone()
        for schema_name, table_name, owner, level in _execute(connection, "icl_dynamics_log_tables").fetchall():
            table = sql.Identifier(schema_name, table_name)
            if owner == writer:
                _execute(connection, "give_table_back", table=table, owner=sql.Identifier(schema_owner))
                report.tables_given_back.append(table_name)
            if level > 0:
                _execute(connection, "revoke_partition", partition=table, **roles)
        if retention_days is not None:
            _execute(connection, "set_retention", {"retention_days": float(retention_days)})
        report.retention_days = _execute(connection, "configured_retention").fetchone()[0]
        connection.commit()
    return report
