"""Hand-written SQL, loaded by name from the package's `sql/*.sql` files.

Each query in a file starts with a header line and a one-line description (not sent to the server):

    -- name: claim_prompt --
    -- Claim the queued prompt of highest priority, oldest first.
    SELECT ...

Values are always bound parameters (`%(name)s`). A query that needs an identifier (a partition's
name) writes `{name}` and is composed with `psycopg.sql.SQL(...).format(name=psycopg.sql.Identifier(...))`.

The package's queries are loaded once per process into `QUERIES`, which every module of the store
reads. The analytics queries for people (the repository's `sql/`, shipped as `icldaemon/sql/analytics`) are
written for psql instead, with psql variables (`:'model'` a quoted value, `:run_id` a bare one), so
that `psql -v model=... -f sql/saturation.sql` runs them as written; `load_analytics_queries` turns
them into the same bound parameters for Python.
"""

import re
from collections.abc import Mapping
from importlib import resources
from importlib.resources.abc import Traversable
from types import MappingProxyType

from icldaemon.exceptions import ConfigurationError

SQL_PACKAGE = "icldaemon"
SQL_DIRECTORY = "sql"
ANALYTICS_DIRECTORY = "sql/analytics"  # a link to the repository's sql/

# What psql itself skips when it substitutes variables: string literals, quoted identifiers, comments,
# dollar quoting and the `::` cast; then its two variable forms. psycopg has no psql-variable syntax
# and sqlparse's tokens do not tell `:'name'` apart, so this small scanner does what psql's lexer does.
_PSQL_TOKEN = re.compile(
    r"""(?P<literal>'(?:[^']|'')*'|"(?:[^"]|"")*"|--[^\n]*|/\*.*?\*/|(?P<dollar>\$\w*\$).*?(?P=dollar)|::)"""
    r"""|:'(?P<quoted>[A-Za-z_]\w*)'|:(?P<bare>[A-Za-z_]\w*)|(?P<percent>%)""",
    re.DOTALL,
)

_HEADER = re.compile(r"^--\s*name:\s*(?P<name>\S*)\s*--\s*$")
_VALID_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


def parse_queries(text: str, source: str) -> dict[str, str]:
    """The queries of one .sql file's text, by name, in file order; `source` names the file in errors."""
    queries: dict[str, str] = {}
    name: str | None = None
    header_line = 0
    body: list[str] = []

    def finish() -> None:
        if name is None:
            return
        sql = "\n".join(body).strip()
        if not sql:
            raise ConfigurationError(f"{source}:{header_line}: query {name!r} has no SQL")
        queries[name] = sql

    lines = text.splitlines()
    description_line = 0
    for line_number, line in enumerate(lines, start=1):
        if line_number == description_line:
            continue
        header = _HEADER.match(line.strip())
        if header is None:
            if name is None and line.strip() and not line.strip().startswith("--"):
                raise ConfigurationError(f"{source}:{line_number}: SQL before the first '-- name: ... --' header")
            if name is not None:
                body.append(line)
            continue
        finish()
        name, header_line, body = header["name"], line_number, []
        if not _VALID_NAME.match(name):
            raise ConfigurationError(
                f"{source}:{line_number}: query name {name!r} is not lower_snake_case"
            )
        if name in queries:
            raise ConfigurationError(f"{source}:{line_number}: query {name!r} is defined twice")
        description_line = line_number + 1
        description = lines[line_number].strip() if line_number < len(lines) else ""
        if not (description.startswith("--") and description.strip("- ")):
            raise ConfigurationError(
                f"{source}:{line_number}: query {name!r} needs a one-line '-- description' under its header"
            )
    finish()
    return queries


def load_queries(directory: Traversable | None = None) -> dict[str, str]:
    """Every query of every .sql file in `directory` (default: the package's sql/), by name; names are unique."""
    queries: dict[str, str] = {}
    origin: dict[str, str] = {}
    if directory is None:
        directory = resources.files(SQL_PACKAGE).joinpath(SQL_DIRECTORY)
    for sql_file in sorted(directory.iterdir(), key=lambda entry: entry.name):
        if not sql_file.name.endswith(".sql"):
            continue
        source = f"{directory.name}/{sql_file.name}"
        for name, sql in parse_queries(sql_file.read_text(encoding="utf-8"), source).items():
            if name in queries:
                raise ConfigurationError(f"query {name!r} is defined in both {origin[name]} and {source}")
            queries[name] = sql
            origin[name] = source
    return queries


def psql_to_psycopg(sql: str) -> tuple[str, list[str]]:
    """A query written with psql variables as one with psycopg's named parameters, and the names it binds.

    `:'since'` and `:run_id` become `%(since)s` and `%(run_id)s`; a literal `%` becomes `%%`.
    """
    names: list[str] = []

    def replace(match: re.Match) -> str:
        if match["literal"] is not None:
            return match["literal"].replace("%", "%%")
        if match["percent"] is not None:
            return "%%"
        name = match["quoted"] or match["bare"]
        if name not in names:
            names.append(name)
        return f"%({name})s"

    return _PSQL_TOKEN.sub(replace, sql), names


def load_analytics_queries(directory: Traversable | None = None) -> dict[str, tuple[str, list[str]]]:
    """The analytics queries (default: the shipped copy of sql/), by name: (psycopg SQL, parameter names)."""
    if directory is None:
        directory = resources.files(SQL_PACKAGE).joinpath(ANALYTICS_DIRECTORY)
    return {name: psql_to_psycopg(sql) for name, sql in load_queries(directory).items()}


QUERIES: Mapping[str, str] = MappingProxyType(load_queries())  # the package's queries: one set for the process
