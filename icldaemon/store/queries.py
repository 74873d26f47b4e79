"""Hand-written SQL, loaded by name from the package's `sql/*.sql` files.

Each query in a file starts with a header line and a one-line description (not sent to the server):

    -- name: claim_prompt --
    -- Claim the queued prompt of highest priority, oldest first.
    SELECT ...

Values are always bound parameters (`%(name)s`). A query that needs an identifier (a partition's
name) writes `{name}` and is composed with `psycopg.sql.SQL(...).format(name=psycopg.sql.Identifier(...))`.
"""

import re
from importlib import resources
from importlib.resources.abc import Traversable

from icldaemon.exceptions import ConfigurationError

SQL_PACKAGE = "icldaemon"
SQL_DIRECTORY = "sql"

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
