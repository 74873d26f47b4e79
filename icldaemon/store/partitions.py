"""Monthly partitions of the log's tables, icl_dynamics_layers and icl_dynamics_tokens, bounded by months in UTC.

They are made by `icl_create_log_partition`, a function of the schema owner (revisions 0008, 0009), so
the writer needs neither CREATE nor ownership of any table. Any login can take the advisory lock that
serialises maintenance, or hold a lock on the log: maintenance waits for none longer than
`LOCK_TIMEOUT` and then fails with the database's lock-timeout error, to be retried at its next round.

A month's partitions are named after their table, `icl_dynamics_layers_y2026m03` and
`icl_dynamics_tokens_y2026m03`, and always made (and dropped, store/retention.py) together: a run's
rows in both tables carry the same created_at, so they always lie in the same month's pair.
"""

import datetime
import re

from sqlalchemy.engine import Connection

from icldaemon.exceptions import ConfigurationError
from icldaemon.store.database import translate_errors
from icldaemon.store.queries import QUERIES

DEFAULT_MONTHS_AHEAD = 2  # months after the current one
LOCK_TIMEOUT = "10s"  # the longest maintenance waits for a lock that another role (any login can) holds
LOG_TABLES = ("icl_dynamics_layers", "icl_dynamics_tokens")  # read together through the view icl_dynamics_log
MONTHLY_PARTITION = re.compile(rf"^(?P<table>{'|'.join(LOG_TABLES)})_y(?P<year>\d{{4}})m(?P<month>\d{{2}})$")


def month_start(day: datetime.date, months_later: int = 0) -> datetime.datetime:
    """Midnight UTC on the first of the month `months_later` months after `day`'s."""
    month_index = day.year * 12 + (day.month - 1) + months_later
    return datetime.datetime(month_index // 12, month_index % 12 + 1, 1, tzinfo=datetime.UTC)


def partition_name(table: str, month: datetime.date) -> str:
    """The name of `table`'s partition for `month`'s rows."""
    return f"{table}_y{month.year:04d}m{month.month:02d}"


def default_partition(table: str) -> str:
    """The name of `table`'s default partition, which holds rows outside every monthly one."""
    return f"{table}_default"


def is_partition(table_name: str) -> bool:
    """Whether a table is one of the log's partitions, which the models do not describe."""
    return (table_name in {default_partition(table) for table in LOG_TABLES}
            or MONTHLY_PARTITION.match(table_name) is not None)


def ensure_partitions(
    conn: Connection, months_ahead: int = DEFAULT_MONTHS_AHEAD, *, today: datetime.date | None = None
) -> list[str]:
    """Create the monthly partitions from this month (UTC) to `months_ahead` months later that do not exist.

    Rows of those months that already landed in a default partition move into the new partitions.
    Runs in the caller's transaction (commit to keep the partitions) and returns the names it created.
    """
    if months_ahead < 0:
        raise ConfigurationError(f"months_ahead must be 0 or more, got {months_ahead}")
    today = today or datetime.datetime.now(datetime.UTC).date()
    url = conn.engine.url.render_as_string(hide_password=False)
    created: list[str] = []
    with translate_errors(url, "creating partitions of icl_dynamics_layers and icl_dynamics_tokens"):
        conn.exec_driver_sql(QUERIES["limit_lock_waits"], {"lock_timeout": LOCK_TIMEOUT})
        conn.exec_driver_sql(QUERIES["lock_icl_dynamics_log_partitions"])
        existing = set(conn.exec_driver_sql(QUERIES["list_icl_dynamics_log_partitions"]).scalars())
        for months_later in range(months_ahead + 1):
            range_start = month_start(today, months_later)
            for table in LOG_TABLES:
                if partition_name(table, range_start) in existing:
                    continue
                # the DDL runs in the schema owner's function: the writer owns no table and creates none
                name = conn.exec_driver_sql(QUERIES["create_icl_dynamics_log_partition"],
                                            {"table": table, "month": range_start}).scalar()
                if name is not None:
                    created.append(name)
    return created
