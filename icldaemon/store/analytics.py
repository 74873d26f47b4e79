"""The analytics queries of sql/ (written for psql) run by name with bound values, for `icldaemon query`."""

from dataclasses import dataclass

import psycopg

from icldaemon.exceptions import BadInputError
from icldaemon.store.database import translate_errors
from icldaemon.store.queries import load_analytics_queries
from icldaemon.store.queue import connection_url


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple]


def analytics_queries() -> dict[str, list[str]]:
    """Every analytics query's name with the variables it needs, in file order."""
    return {name: names for name, (_sql, names) in load_analytics_queries().items()}


def checked_query(name: str, values: dict[str, object]) -> tuple[str, dict[str, object]]:
    """Query `name`'s SQL and its parameters, once the name and the variables given are checked."""
    queries = load_analytics_queries()
    if name not in queries:
        raise BadInputError(f"no analytics query {name!r}; the queries are: {', '.join(queries)}")
    sql, needed = queries[name]
    missing = [variable for variable in needed if variable not in values]
    if missing:
        raise BadInputError(f"query {name} needs " + ", ".join(f"-v {variable}=..." for variable in missing))
    unknown = sorted(set(values) - set(needed))
    if unknown:
        raise BadInputError(f"query {name} has no variable {', '.join(unknown)}; it takes "
                            f"{', '.join(needed) or 'none'}")
    return sql, {variable: values[variable] for variable in needed}


def run_analytics_query(connection: psycopg.Connection, name: str, values: dict[str, object]) -> QueryResult:
    """Run analytics query `name` with `values` bound to its psql variables (strings are typed by the server)."""
    sql, parameters = checked_query(name, values)
    with translate_errors(connection_url(connection), f"running query {name}"), connection.transaction():
        cursor = connection.execute(sql, parameters)
        return QueryResult([column.name for column in cursor.description], cursor.fetchall())
