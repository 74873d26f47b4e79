"""Monthly partitions of icl_dynamics_log, named icl_dynamics_log_yYYYYmMM, bounded by months in UTC."""

import datetime
import re

from psycopg import sql
from sqlalchemy.engine import Connection

from icldaemon.exceptions import ConfigurationError
from icldaemon.store.database import translate_errors
from icldaemon.store.queries import load_queries

DEFAULT_MONTHS_AHEAD = 2  # months after the current one
PARTITION_PREFIX = "icl_dynamics_log_y"
DEFAULT_PARTITION = "icl_dynamics_log_default"
_PARTITION_NAME = re.compile(rf"^{PARTITION_PREFIX}\d{{4}}m\d{{2}}$")

QUERIES = load_queries()


def month_start(day: datetime.date, months_later: int = 0) -> datetime.datetime:
    """Midnight UTC on the first of the month `months_later` months after `day`'s."""
    month_index = day.year * 12 + (day.month - 1) + months_later
    return datetime.datetime(month_index // 12, month_index % 12 + 1, 1, tzinfo=datetime.UTC)


def partition_name(month: datetime.date) -> str:
    return f"{PARTITION_PREFIX}{month.year:04d}m{month.month:02d}"


def is_partition(table_name: str) -> bool:
    """Whether a table is one of icl_dynamics_log's partitions, which the models do not describe."""
    return table_name == DEFAULT_PARTITION or _PARTITION_NAME.match(table_name) is not None


def ensure_partitions(
    conn: Connection, months_ahead: int = DEFAULT_MONTHS_AHEAD, *, today: datetime.date | None = None
) -> list[str]:
    """Create the monthly partitions from this month (UTC) to `months_ahead` months later that do not exist.

    Rows of those months that already landed in the default partition move into the new partitions.
    Runs in the caller's transaction (commit to keep the partitions) and returns the names it created.
    """
    if months_ahead < 0:
        raise ConfigurationError(f"months_ahead must be 0 or more, got {months_ahead}")
    today = today or datetime.datetime.now(datetime.UTC).date()
    driver_connection = conn.connection.driver_connection
    url = conn.engine.url.render_as_string(hide_password=False)

    def execute(query_name: str, parameters: dict | None = None, **identifiers: sql.Composable):
        statement = sql.SQL(QUERIES[query_name]).format(**identifiers).as_string(driver_connection)
        return conn.exec_driver_sql(statement, parameters) if parameters else conn.exec_driver_sql(statement)

    created: list[str] = []
    with translate_errors(url, "creating partitions of icl_dynamics_log"):
        execute("lock_icl_dynamics_log_partitions")
        existing = set(execute("list_icl_dynamics_log_partitions").scalars())
        for months_later in range(months_ahead + 1):
            range_start = month_start(today, months_later)
            range_end = month_start(today, months_later + 1)
            name = partition_name(range_start)
            if name in existing:
                continue
            partition = sql.Identifier(name)
            execute("create_icl_dynamics_log_partition_table", partition=partition)
            execute(
                "move_rows_from_icl_dynamics_log_default",
                {"range_start": range_start, "range_end": range_end},
                partition=partition,
            )
            execute(
                "attach_icl_dynamics_log_partition",
                partition=partition,
                range_start=sql.Literal(range_start),
                range_end=sql.Literal(range_end),
            )
            created.append(name)
    return created
