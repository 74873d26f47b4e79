"""Retention of the log: whole monthly partitions whose every row is older than the retention are dropped.

The retention is the schema owner's decision: `icl_config.retention_days`, set by `icldaemon roles
--retention-days` (or by a daemon that runs as the schema owner, from its ICLD_RETENTION_DAYS), and
enforced by the owner's function that drops a partition, whatever its caller asks. A daemon running as
another role drops nothing while none is configured, and never more than the configuration allows;
its own ICLD_RETENTION_DAYS can only keep more.

The log's tables (icl_dynamics_layers and icl_dynamics_tokens, read through the view
icl_dynamics_log) are partitioned alike by month; a month's partitions of both go together. Dropping a
partition costs nothing next to deleting its rows one by one, and leaves no dead tuples to vacuum. A
month is dropped only once its end lies `retention_days` in the past, so a row is kept at least that
long and at most a month longer. measurement_runs and the memory tables are kept: they are small, and
consolidation reads the memory patches.
"""

import datetime

from sqlalchemy.engine import Connection

from icldaemon.exceptions import ConfigurationError
from icldaemon.store.database import create_unpooled_engine_for, translate_errors
from icldaemon.store.partitions import LOCK_TIMEOUT, MONTHLY_PARTITION, ensure_partitions, month_start
from icldaemon.store.queries import QUERIES


def expired_partitions(names: list[str], retention_days: float, now: datetime.datetime) -> list[str]:
    """The monthly partitions among `names` whose month ended at least `retention_days` before `now`."""
    cutoff = now - datetime.timedelta(days=retention_days)
    expired = []
    for name in sorted(names):
        match = MONTHLY_PARTITION.match(name)
        if match is None:
            continue  # a default partition holds rows of any time; partition maintenance empties it
        month = datetime.date(int(match["year"]), int(match["month"]), 1)
        if month_start(month, 1) <= cutoff:
            expired.append(name)
    return expired


def effective_retention(conn: Connection, retention_days: float) -> float | None:
    """The retention to apply for a daemon that asks for `retention_days`: the configured one, or the
    daemon's where it keeps more; None when none is configured and the daemon may not configure it.

    A daemon running as the schema owner makes its retention the configured one.
    """
    configured, is_owner = conn.exec_driver_sql(QUERIES["configured_retention"]).one()
    if is_owner:
        if configured != retention_days:
            conn.exec_driver_sql(QUERIES["set_retention"], {"retention_days": float(retention_days)})
        return float(retention_days)
    return None if configured is None else max(float(configured), float(retention_days))


def drop_expired_partitions(
    conn: Connection, retention_days: float, *, now: datetime.datetime | None = None
) -> list[str]:
    """Drop the monthly partitions of the log's tables older than the retention; returns their names.

    Runs in the caller's transaction, serialised with partition creation by the same advisory lock.
    Drops nothing while the database has no retention configured (see `effective_retention`).
    """
    return _drop_expired(conn, retention_days, now)[0]


def _drop_expired(conn: Connection, retention_days: float,
                  now: datetime.datetime | None) -> tuple[list[str], float | None]:
    """drop_expired_partitions, with the retention it applied (None: none configured)."""
    if not 0 < retention_days < float("inf"):
        raise ConfigurationError(f"the retention must be a positive number of days, got {retention_days}")
    now = now or datetime.datetime.now(datetime.UTC)
    url = conn.engine.url.render_as_string(hide_password=False)
    with translate_errors(url, "dropping expired partitions of icl_dynamics_layers and icl_dynamics_tokens"):
        conn.exec_driver_sql(QUERIES["limit_lock_waits"], {"lock_timeout": LOCK_TIMEOUT})
        retention = effective_retention(conn, retention_days)
        if retention is None:
            return [], None
        conn.exec_driver_sql(QUERIES["lock_icl_dynamics_log_partitions"])
        names = list(conn.exec_driver_sql(QUERIES["list_icl_dynamics_log_partitions"]).scalars())
        expired = expired_partitions(names, retention, now)
        for name in expired:
            # the schema owner's function drops it, and only a month that ended before the configured retention
            conn.exec_driver_sql(QUERIES["drop_icl_dynamics_log_partition"], {"partition": name})
    return expired, retention


def maintain_partitions(url: str, retention_days: float | None) -> tuple[list[str], list[str], float | None]:
    """The log's partitions kept ahead and, with a retention, the expired ones dropped, in one transaction:
    (created, dropped, the retention applied: None where none was asked for or none is configured)."""
    engine = create_unpooled_engine_for(url)
    try:
        with engine.begin() as connection:
            created = ensure_partitions(connection)
            dropped, applied = _drop_expired(connection, retention_days, None) if retention_days else ([], None)
    finally:
        engine.dispose()
    return created, dropped, applied
