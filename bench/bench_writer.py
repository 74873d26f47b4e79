"""(layer, token) values per second into the log: the writer's binary COPY of float32 arrays vs executemany vs psql's \\copy.

    python bench/bench_writer.py [--layers 30] [--tokens 4000] [--repeat 3]

Uses a fresh database on ICLD_BENCH_DATABASE_URL's server (default postgresql://postgres@127.0.0.1:5432/postgres),
migrated to head (every index in place), dropped afterwards. Every method writes the same run (a measurement of
`layers` x `tokens`, a few NaN): one icl_dynamics_layers row per layer (the six quantities as float32 arrays) and
one icl_dynamics_tokens row; the tables are truncated between methods. The figure is (layer, token) values, the rows
of the view icl_dynamics_log, per second.
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

from icldaemon.columns import DYNAMICS_NAMES
from icldaemon.store import migrate
from icldaemon.store.writer import (
    LAYER_COLUMNS,
    LAYERS_COPY,
    TOKEN_COLUMNS,
    TOKENS_COPY,
    PreparedResults,
    layer_rows,
    token_fields,
)

DEFAULT_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TARGET_VALUES_PER_SECOND = 1_000_000
RUN_ID = 1


def synthetic(layers: int, tokens: int):
    rng = np.random.default_rng(0)
    dynamics = {name: rng.random((layers, tokens)) for name in DYNAMICS_NAMES}
    dynamics["delta_norm"][:, ::50] = np.nan
    words = ["the", " cat", " sat", " on", " a", " mat", ",", "\n", " Miso", " café"]
    token_infos = [SimpleNamespace(index=i, position=i + 4, text=words[i % len(words)],
                                   segment="context" if i % 300 < 200 else "memory:7",
                                   memory_id=None if i % 300 < 200 else 7) for i in range(tokens)]
    return dynamics, token_infos


def _float_list(values) -> list[float | None]:
    return [None if math.isnan(value) else float(np.float32(value)) for value in values]


def layer_parameters(dynamics) -> list[tuple]:
    layers = dynamics[DYNAMICS_NAMES[0]].shape[0]
    return [(RUN_ID, layer_idx, *(_float_list(dynamics[name][layer_idx]) for name in DYNAMICS_NAMES))
            for layer_idx in range(layers)]


def token_parameters(tokens) -> tuple:
    return (RUN_ID, [t.position for t in tokens], [t.text for t in tokens], [t.segment for t in tokens],
            [t.memory_id for t in tokens])


def truncate(connection) -> None:
    connection.execute("TRUNCATE icl_dynamics_layers, icl_dynamics_tokens")
    connection.commit()


def count(connection) -> int:
    return connection.execute("SELECT count(*) FROM icl_dynamics_log").fetchone()[0]


def bench_copy(connection, dynamics, tokens) -> tuple[float, float]:
    """Seconds to assemble and send the writer's payloads (and commit), and to assemble them alone."""
    started = time.perf_counter()
    layer_rows(dynamics)
    token_fields(tokens)
    built = time.perf_counter() - started
    started = time.perf_counter()
    prepared = PreparedResults(prompt_id=RUN_ID, run={}, layer_rows=layer_rows(dynamics),
                               token_fields=token_fields(tokens))
    with connection.cursor() as cursor:
        with cursor.copy(LAYERS_COPY) as copy:
            copy.write(prepared.layers_payload(RUN_ID))
        with cursor.copy(TOKENS_COPY) as copy:
            copy.write(prepared.tokens_payload(RUN_ID))
    connection.commit()
    return time.perf_counter() - started, built


def bench_executemany(connection, dynamics, tokens) -> float:
    def insert(table: str, columns: tuple[str, ...]) -> sql.Composed:
        return sql.SQL("INSERT INTO {table} ({columns}) VALUES ({values})").format(
            table=sql.Identifier(table), columns=sql.SQL(", ").join(map(sql.Identifier, columns)),
            values=sql.SQL(", ").join(sql.Placeholder() * len(columns)))

    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.executemany(insert("icl_dynamics_layers", LAYER_COLUMNS), layer_parameters(dynamics))
        cursor.execute(insert("icl_dynamics_tokens", TOKEN_COLUMNS), token_parameters(tokens))
    connection.commit()
    return time.perf_counter() - started


def _array_literal(values) -> str:
    def element(value) -> str:
        if value is None:
            return "NULL"
        if isinstance(value, str):
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(value)

    return "{" + ",".join(element(value) for value in values) + "}"


def bench_psql(url: str, layers_csv: Path, tokens_csv: Path) -> float:
    commands = [f"\\copy icl_dynamics_layers ({', '.join(LAYER_COLUMNS)}) FROM '{layers_csv}' WITH (FORMAT csv)",
                f"\\copy icl_dynamics_tokens ({', '.join(TOKEN_COLUMNS)}) FROM '{tokens_csv}' WITH (FORMAT csv)"]
    started = time.perf_counter()
    subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-q", "-1", *(item for command in commands
                                                                      for item in ("-c", command))], check=True)
    return time.perf_counter() - started


def run(layers: int = 30, tokens: int = 4000, repeat: int = 3) -> dict:
    """Median (layer, token) values/s of each method over `repeat` rounds, on a fresh database dropped afterwards."""
    if shutil.which("psql") is None:
        raise SystemExit("psql is not on PATH")
    server = os.environ.get("ICLD_BENCH_DATABASE_URL", DEFAULT_SERVER_URL)
    database = f"icld_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    url = make_url(server).set(database=database).render_as_string(hide_password=False)
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    try:
        migrate.upgrade(url)
        dynamics, token_infos = synthetic(layers, tokens)
        total = layers * tokens
        with tempfile.TemporaryDirectory() as directory:
            layers_csv, tokens_csv = Path(directory) / "layers.csv", Path(directory) / "tokens.csv"
            with layers_csv.open("w", newline="", encoding="utf-8") as handle:
                csv.writer(handle).writerows([row[0], row[1], *(_array_literal(values) for values in row[2:])]
                                             for row in layer_parameters(dynamics))
            with tokens_csv.open("w", newline="", encoding="utf-8") as handle:
                row = token_parameters(token_infos)
                csv.writer(handle).writerow([row[0], *(_array_literal(values) for values in row[1:])])
            results: dict[str, list[float]] = {"copy": [], "copy payload": [], "executemany": [], "psql \\copy": []}
            with psycopg.connect(url) as connection:
                for _ in range(repeat):
                    truncate(connection)
                    seconds, payload_seconds = bench_copy(connection, dynamics, token_infos)
                    assert count(connection) == total
                    results["copy"].append(total / seconds)
                    results["copy payload"].append(total / payload_seconds)
                    truncate(connection)
                    results["psql \\copy"].append(total / bench_psql(url, layers_csv, tokens_csv))
                    assert count(connection) == total
                    truncate(connection)
                    results["executemany"].append(total / bench_executemany(connection, dynamics, token_infos))
                    assert count(connection) == total
                truncate(connection)
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
    return {"layers": layers, "tokens": tokens, "rows": total, "repeat": repeat,
            "rows_per_second": {method: statistics.median(rates) for method, rates in results.items()}}


def print_report(result: dict) -> None:
    rates = result["rows_per_second"]
    copy_rate = rates["copy"]
    print(f"one run of {result['layers']} layers x {result['tokens']} tokens = {result['rows']:,} (layer, token) values "
          f"({result['layers']} icl_dynamics_layers rows, one icl_dynamics_tokens row), median of {result['repeat']}")
    print(f"{'method':<36} {'values/s':>12} {'copy / method':>14}")
    labels = {
        "copy": "writer: binary COPY (build + send)",
        "copy payload": "  of which building the payload",
        "psql \\copy": "psql \\copy of a CSV (process incl.)",
        "executemany": "psycopg executemany INSERT",
    }
    for method, label in labels.items():
        print(f"{label:<36} {rates[method]:>12,.0f} {copy_rate / rates[method]:>13.2f}x")
    verdict = "meets" if copy_rate >= TARGET_VALUES_PER_SECOND else "misses"
    print(f"writer COPY {verdict} the target of {TARGET_VALUES_PER_SECOND:,} values/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print_report(run(args.layers, args.tokens, args.repeat))


if __name__ == "__main__":
    main()
