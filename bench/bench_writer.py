"""Rows per second into icl_dynamics_log: the writer's binary COPY vs executemany vs psql's own \\copy of a CSV.

    python bench/bench_writer.py [--layers 30] [--tokens 4000] [--executemany-rows 30000] [--repeat 3]

Uses a fresh database on ICLD_BENCH_DATABASE_URL's server (default postgresql://postgres@127.0.0.1:5432/postgres),
migrated to head (all of the table's indexes in place), dropped afterwards. Every method writes the same
rows (a measurement of `layers` x `tokens`, a few NaN) into the empty table; the table is truncated between runs.
"""

import argparse
import csv
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from icldaemon.store import migrate
from icldaemon.store.writer import (
    COPY_COLUMNS,
    DYNAMICS_NAMES,
    copy_dynamics,
    dynamics_copy_chunks,
    dynamics_copy_payload,
)

DEFAULT_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TARGET_ROWS_PER_SECOND = 200_000


def synthetic(layers: int, tokens: int):
    rng = np.random.default_rng(0)
    dynamics = {name: rng.random((layers, tokens)) for name in DYNAMICS_NAMES}
    dynamics["delta_norm"][:, ::50] = np.nan
    words = ["the", " cat", " sat", " on", " a", " mat", ",", "\n", " Miso", " café"]
    token_infos = [SimpleNamespace(index=i, position=i + 4, text=words[i % len(words)],
                                   segment="context" if i % 300 < 200 else "memory:7",
                                   memory_id=None if i % 300 < 200 else 7) for i in range(tokens)]
    run = dict(run_id=1, prompt_id=1, session_id=uuid.uuid4(), prompt_hash="ab" * 32, model="bench-model")
    return dynamics, token_infos, run


def rows_of(dynamics, tokens, run) -> list[tuple]:
    layers = dynamics[DYNAMICS_NAMES[0]].shape[0]
    rows = []
    for layer_idx in range(layers):
        values = [dynamics[name][layer_idx] for name in DYNAMICS_NAMES]
        for token in tokens:
            numbers = [None if math.isnan(column[token.index]) else float(column[token.index]) for column in values]
            rows.append((layer_idx, *numbers, token.index, token.position, token.text, token.segment,
                         token.memory_id, run["run_id"], run["prompt_id"], run["session_id"], run["prompt_hash"],
                         run["model"]))
    return rows


def truncate(connection) -> None:
    connection.execute("TRUNCATE icl_dynamics_log")
    connection.commit()


def count(connection) -> int:
    return connection.execute("SELECT count(*) FROM icl_dynamics_log").fetchone()[0]


def bench_copy(connection, dynamics, tokens, run) -> tuple[float, float]:
    started = time.perf_counter()
    dynamics_copy_payload(dynamics, tokens, **run)
    built = time.perf_counter() - started
    truncate(connection)
    started = time.perf_counter()
    copy_dynamics(connection, dynamics_copy_chunks(dynamics, tokens, **run))  # built while sent, as the writer does
    connection.commit()
    return time.perf_counter() - started, built


def bench_executemany(connection, rows) -> float:
    statement = sql.SQL("INSERT INTO icl_dynamics_log ({columns}) VALUES ({values})").format(
        columns=sql.SQL(", ").join(map(sql.Identifier, COPY_COLUMNS)),
        values=sql.SQL(", ").join(sql.Placeholder() * len(COPY_COLUMNS)),
    )
    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.executemany(statement, rows)
    connection.commit()
    return time.perf_counter() - started


def bench_psql(url: str, csv_path: Path) -> float:
    command = (f"\\copy icl_dynamics_log ({', '.join(COPY_COLUMNS)}) FROM '{csv_path}' WITH (FORMAT csv)")
    started = time.perf_counter()
    subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-q", "-c", command], check=True)
    return time.perf_counter() - started


def run(layers: int = 30, tokens: int = 4000, executemany_rows: int = 30_000, repeat: int = 3) -> dict:
    """Median rows/s of each method over `repeat` rounds, on a fresh database dropped afterwards."""
    if shutil.which("psql") is None:
        raise SystemExit("psql is not on PATH")
    server = os.environ.get("ICLD_BENCH_DATABASE_URL", DEFAULT_SERVER_URL)
    database = f"icld_bench_{os.getpid()}"
    url = make_url(server).set(database=database).render_as_string(hide_password=False)
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    try:
        migrate.upgrade(url)
        dynamics, token_infos, run_values = synthetic(layers, tokens)
        rows = rows_of(dynamics, token_infos, run_values)
        total = len(rows)
        with tempfile.TemporaryDirectory() as directory:
            csv_path = Path(directory) / "rows.csv"
            with csv_path.open("w", newline="", encoding="utf-8") as handle:
                csv.writer(handle).writerows(["" if value is None else value for value in row] for row in rows)
            results: dict[str, list[float]] = {"copy": [], "copy payload": [], "executemany": [], "psql \\copy": []}
            with psycopg.connect(url) as connection:
                for _ in range(repeat):
                    truncate(connection)
                    seconds, payload_seconds = bench_copy(connection, dynamics, token_infos, run_values)
                    assert count(connection) == total
                    results["copy"].append(total / seconds)
                    results["copy payload"].append(total / payload_seconds)
                    truncate(connection)
                    results["psql \\copy"].append(total / bench_psql(url, csv_path))
                    assert count(connection) == total
                    truncate(connection)
                    subset = rows[:executemany_rows]
                    results["executemany"].append(len(subset) / bench_executemany(connection, subset))
                    assert count(connection) == len(subset)
                truncate(connection)
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
    return {"layers": layers, "tokens": tokens, "rows": total, "executemany_rows": min(executemany_rows, total),
            "repeat": repeat, "rows_per_second": {method: statistics.median(rates) for method, rates in results.items()}}


def print_report(result: dict) -> None:
    rates = result["rows_per_second"]
    copy_rate = rates["copy"]
    print(f"icl_dynamics_log, {result['layers']} layers x {result['tokens']} tokens = {result['rows']:,} rows "
          f"(executemany: first {result['executemany_rows']:,}), median of {result['repeat']}")
    print(f"{'method':<34} {'rows/s':>12} {'copy / method':>14}")
    labels = {
        "copy": "writer: binary COPY (build + send)",
        "copy payload": "  of which building the payload",
        "psql \\copy": "psql \\copy of a CSV (process incl.)",
        "executemany": "psycopg executemany INSERT",
    }
    for method, label in labels.items():
        print(f"{label:<34} {rates[method]:>12,.0f} {copy_rate / rates[method]:>13.2f}x")
    verdict = "meets" if copy_rate >= TARGET_ROWS_PER_SECOND else "misses"
    print(f"writer COPY {verdict} the target of {TARGET_ROWS_PER_SECOND:,} rows/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--executemany-rows", type=int, default=30_000, help="executemany is slow: a prefix")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print_report(run(args.layers, args.tokens, args.executemany_rows, args.repeat))


if __name__ == "__main__":
    main()
