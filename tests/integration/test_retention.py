"""ICLD_RETENTION_DAYS: whole monthly partitions of the log's tables older than the retention are dropped."""

import datetime

import psycopg
import pydantic
import pytest
from analytics_fixtures import load_tiny

from icldaemon.service import Service
from icldaemon.settings import Settings
from icldaemon.store.database import create_unpooled_engine_for
from icldaemon.store.partitions import ensure_partitions, partition_name
from icldaemon.store.retention import drop_expired_partitions, expired_partitions


def with_connection(url: str, work):
    engine = create_unpooled_engine_for(url)
    try:
        with engine.begin() as connection:
            return work(connection)
    finally:
        engine.dispose()


def rows_by_month(url: str) -> dict[str, int]:
    with psycopg.connect(url) as connection:
        return dict(connection.execute(
            "SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM'), count(*) FROM icl_dynamics_log GROUP BY 1"
        ).fetchall())


def partitions(url: str, table: str = "icl_dynamics_layers") -> list[str]:
    with psycopg.connect(url) as connection:
        return [name for (name,) in connection.execute(
            "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = %s::regclass ORDER BY 1", (table,))]


def insert_rows(url: str, times: list[str]) -> None:
    """One run per time, of one layer and one context token, as the writer writes them."""
    with psycopg.connect(url) as connection:
        for run_id, created_at in enumerate(times, start=1):
            connection.execute(
                "INSERT INTO icl_dynamics_layers (run_id, layer_idx, created_at, delta_norm, update_frobenius_norm, "
                "marginal_update_norm, cumulative_update_norm, implicit_learning_rate, bias_update_norm) "
                "VALUES (%s, 0, %s, '{1}', '{1}', '{1}', '{1}', '{1}', '{1}')", (run_id, created_at))
            connection.execute("INSERT INTO icl_dynamics_tokens (run_id, created_at, token_position, token_text, "
                               "segment, memory_id) VALUES (%s, %s, '{3}', '{a}', '{context}', '{NULL}')",
                               (run_id, created_at))


def test_only_months_that_ended_before_the_retention_are_dropped(database_url):
    with_connection(database_url, lambda connection: ensure_partitions(connection, 3, today=datetime.date(2026, 1, 5)))
    insert_rows(database_url, ["2026-01-31 23:59:59+00", "2026-02-01 00:00:00+00", "2026-03-15 12:00:00+00",
                               "2026-04-02 00:00:00+00", "2030-01-01 00:00:00+00"])
    # 30 days before 3 March 2026 is 1 February 2026, the end of January: January goes, February stays
    now = datetime.datetime(2026, 3, 3, tzinfo=datetime.UTC)

    dropped = with_connection(database_url, lambda connection: drop_expired_partitions(connection, 30, now=now))
    dropped_again = with_connection(database_url, lambda connection: drop_expired_partitions(connection, 30, now=now))

    assert dropped == ["icl_dynamics_layers_y2026m01", "icl_dynamics_tokens_y2026m01"] and dropped_again == []
    for table in ("icl_dynamics_layers", "icl_dynamics_tokens"):
        assert partitions(database_url, table) == [f"{table}_default", f"{table}_y2026m02", f"{table}_y2026m03",
                                                   f"{table}_y2026m04"]
    # the default partition's rows (here from 2030) are not the retention's to judge
    assert rows_by_month(database_url) == {"2026-02": 1, "2026-03": 1, "2026-04": 1, "2030-01": 1}


def test_expired_partitions_reads_months_from_names_and_skips_others():
    names = ["icl_dynamics_layers_default", "icl_dynamics_layers_y2025m12", "icl_dynamics_tokens_y2025m12",
             "icl_dynamics_layers_y2026m01", "icl_dynamics_tokens_default", "icl_dynamics_log_y2025m11", "unrelated"]
    at_the_end_of_january = datetime.datetime(2026, 2, 1, tzinfo=datetime.UTC)

    assert expired_partitions(names, 1, at_the_end_of_january) == ["icl_dynamics_layers_y2025m12",
                                                                   "icl_dynamics_tokens_y2025m12"]
    assert expired_partitions(names, 1, at_the_end_of_january + datetime.timedelta(days=1)) == [
        "icl_dynamics_layers_y2025m12", "icl_dynamics_layers_y2026m01", "icl_dynamics_tokens_y2025m12"]


def test_the_daemons_partition_maintenance_applies_the_retention(database_url, tmp_path, monkeypatch):
    long_ago = datetime.date(2024, 5, 1)
    with_connection(database_url, lambda connection: ensure_partitions(connection, 0, today=long_ago))
    insert_rows(database_url, ["2024-05-20 00:00:00+00"])
    monkeypatch.setenv("ICLD_RETENTION_DAYS", "90")
    tiny = load_tiny(tmp_path / "tiny-llama", tmp_path / "models")

    service = Service.from_settings(database_url, tiny, Settings(), worker_id="retention")
    service.maintain_partitions()

    this_month = datetime.datetime.now(datetime.UTC).date()
    assert service.retention_days == 90
    for table in ("icl_dynamics_layers", "icl_dynamics_tokens"):
        assert partition_name(table, long_ago) not in partitions(database_url, table)
        assert partition_name(table, this_month) in partitions(database_url, table)
    assert rows_by_month(database_url) == {}


@pytest.mark.parametrize("days", ["0", "-3", "forever"])
def test_a_retention_that_is_not_a_positive_number_of_days_is_refused(monkeypatch, days):
    monkeypatch.setenv("ICLD_RETENTION_DAYS", days)

    with pytest.raises(pydantic.ValidationError, match="retention_days"):
        Settings()
