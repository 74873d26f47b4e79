"""The analytics views (schema icl_analytics) and the queries in sql/, on measured data, against plain Python."""

import csv
import datetime
import decimal
import io
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import psycopg
import pytest
from analytics_fixtures import STRIDED, database_from_template, load_tiny, populate
from psycopg.rows import dict_row

from icldaemon.store.queries import load_analytics_queries, parse_queries, psql_to_psycopg

SQL_DIRECTORY = Path(__file__).resolve().parents[2] / "sql"
SATURATION_TOLERANCE = 0.1  # share of the final value, as the view icl_analytics.run_layers defines it
LONG_AGO = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)


@pytest.fixture(scope="module")
def measured(pg_server_url, _template_database, tmp_path_factory):
    tiny = load_tiny(tmp_path_factory.mktemp("tiny-llama"), tmp_path_factory.mktemp("models"))
    with database_from_template(pg_server_url, _template_database) as url:
        yield populate(url, tiny)


def rows(url: str, sql: str, parameters=None) -> list[dict]:
    with psycopg.connect(url, row_factory=dict_row) as connection:
        return connection.execute(sql, parameters).fetchall()


def query(name: str) -> str:
    """An analytics query of sql/ as Python runs it (psql variables bound as parameters)."""
    return load_analytics_queries(SQL_DIRECTORY)[name][0]


def average_ranks(values: list[float]) -> list[float]:
    """1-based ranks, ascending, ties sharing the mean of the ranks they span."""
    ranks = [0.0] * len(values)
    for index, value in enumerate(values):
        below = sum(other < value for other in values)
        equal = sum(other == value for other in values)
        ranks[index] = below + (equal + 1) / 2
    return ranks


# --- per run and layer, from the raw log


def expected_run_layers(url: str) -> dict[tuple[int, int], dict]:
    log = rows(url, "SELECT run_id, layer_idx, token_idx, update_frobenius_norm, cumulative_update_norm, "
                    "bias_update_norm FROM icl_dynamics_log ORDER BY run_id, layer_idx, token_idx")
    context_tokens = dict((run["id"], run["context_tokens"])
                          for run in rows(url, "SELECT id, context_tokens FROM measurement_runs"))
    by_layer = defaultdict(list)
    for row in log:
        if row["update_frobenius_norm"] is not None:
            by_layer[row["run_id"], row["layer_idx"]].append(row)
    expected = {}
    for (run_id, layer_idx), measured in by_layer.items():
        final = measured[-1]
        unsettled = [row["token_idx"] for row in measured
                     if abs(row["update_frobenius_norm"] - final["update_frobenius_norm"])
                     > SATURATION_TOLERANCE * final["update_frobenius_norm"]]
        saturation = next(row["token_idx"] for row in measured if not unsettled or row["token_idx"] > max(unsettled))
        path = next(row["token_idx"] for row in measured
                    if row["cumulative_update_norm"] >= (1 - SATURATION_TOLERANCE) * final["cumulative_update_norm"])
        expected[run_id, layer_idx] = {
            "measured_tokens": len(measured), "final_update_norm": final["update_frobenius_norm"],
            "final_bias_update_norm": final["bias_update_norm"], "saturation_token_idx": saturation,
            "saturation_fraction": (saturation + 1) / context_tokens[run_id], "path_saturation_token_idx": path,
        }
    for (run_id, layer_idx), entry in expected.items():
        layers = [other for (other_run, _), other in expected.items() if other_run == run_id]
        entry["update_norm_share"] = entry["final_update_norm"] / sum(other["final_update_norm"] for other in layers)
        entry["bias_update_norm_share"] = (entry["final_bias_update_norm"]
                                           / sum(other["final_bias_update_norm"] for other in layers))
    return expected


def test_run_layers_saturation_and_shares_match_the_raw_log(measured):
    expected = expected_run_layers(measured.url)
    found = {(row["run_id"], row["layer_idx"]): row for row in rows(measured.url, "SELECT * FROM icl_analytics.run_layers")}

    assert set(found) == set(expected) and len(found) == 2 * len(measured.prompt_ids)
    for key, entry in expected.items():
        for name, value in entry.items():
            assert found[key][name] == pytest.approx(value, rel=1e-9), (key, name)
    strided_run = rows(measured.url, "SELECT id, context_tokens FROM measurement_runs WHERE prompt_id = %s",
                       (measured.prompt_ids[-1],))[0]
    assert found[strided_run["id"], 0]["measured_tokens"] < strided_run["context_tokens"]
    assert found[strided_run["id"], 0]["measured_tokens"] >= strided_run["context_tokens"] / STRIDED


def test_saturation_by_layer_averages_the_runs_of_the_model(measured):
    expected = expected_run_layers(measured.url)

    found = rows(measured.url, query("saturation_by_layer"),
                 {"model": measured.model, "since": LONG_AGO})

    assert [row["layer_idx"] for row in found] == [0, 1]
    for row in found:
        fractions = [entry["saturation_fraction"] for (_, layer), entry in expected.items() if layer == row["layer_idx"]]
        assert row["runs"] == len(fractions)
        assert row["mean_saturation_fraction"] == pytest.approx(np.mean(fractions))
        assert row["median_saturation_fraction"] == pytest.approx(np.median(fractions))


# --- memories


def expected_memories(url: str) -> dict[int, dict]:
    effects = rows(url, "SELECT memory_id, kl, update_frobenius_norm FROM memory_effects")
    per_memory = defaultdict(lambda: {"kl": [], "total": []})
    for effect in effects:
        per_memory[effect["memory_id"]]["kl"].append(effect["kl"])
        per_memory[effect["memory_id"]]["total"].append(math.sqrt(sum(n * n for n in effect["update_frobenius_norm"])))
    return {memory_id: {"runs": len(values["kl"]), "mean_kl": np.mean(values["kl"]),
                        "mean_total_update_norm": np.mean(values["total"])}
            for memory_id, values in per_memory.items()}


def test_memories_by_impact_ranks_kl_and_patch_norm(measured):
    expected = expected_memories(measured.url)

    found = rows(measured.url, query("memories_by_impact"), {"model": measured.model})

    assert {row["memory_id"] for row in found} == set(measured.memory_ids.values()) == set(expected)
    assert [row["memory_id"] for row in found] == sorted(expected, key=lambda memory: -expected[memory]["mean_kl"])
    by_norm = sorted(expected, key=lambda memory: -expected[memory]["mean_total_update_norm"])
    for row in found:
        entry = expected[row["memory_id"]]
        assert row["runs"] == entry["runs"]
        assert row["mean_kl"] == pytest.approx(entry["mean_kl"])
        assert row["mean_total_update_norm"] == pytest.approx(entry["mean_total_update_norm"])
        assert row["update_norm_rank"] == by_norm.index(row["memory_id"]) + 1
    key_of = {memory_id: key for key, memory_id in measured.memory_ids.items()}
    assert all(row["memory_key"] == key_of[row["memory_id"]] for row in found)


def test_impact_agreement_is_spearmans_rank_correlation(measured):
    expected = expected_memories(measured.url)
    kl = [entry["mean_kl"] for entry in expected.values()]
    norm = [entry["mean_total_update_norm"] for entry in expected.values()]

    (found,) = rows(measured.url, query("impact_agreement"), {"model": measured.model})

    assert found["memories"] == len(expected) == 4
    assert found["spearman_kl_vs_update_norm"] == pytest.approx(np.corrcoef(average_ranks(kl), average_ranks(norm))[0, 1])
    assert found["pearson_kl_vs_update_norm"] == pytest.approx(np.corrcoef(kl, norm)[0, 1])


def test_memory_layers_splits_one_memorys_patches_by_layer(measured):
    memory_id = measured.memory_ids["colour"]
    effects = rows(measured.url, "SELECT update_frobenius_norm FROM memory_effects WHERE memory_id = %s", (memory_id,))
    per_layer = np.array([effect["update_frobenius_norm"] for effect in effects])  # [runs, num_layers]

    found = rows(measured.url, query("memory_layers"),
                 {"memory_id": memory_id, "model": measured.model})

    assert [row["layer_idx"] for row in found] == [0, 1]
    for row in found:
        assert row["runs"] == len(effects) == 3
        assert row["mean_update_norm"] == pytest.approx(per_layer[:, row["layer_idx"]].mean())
        assert row["update_norm_share"] == pytest.approx(per_layer[:, row["layer_idx"]].sum() / per_layer.sum())


# --- sessions, exactness, queue


def test_session_summary_counts_prompts_runs_and_memories(measured):
    prompts = rows(measured.url, "SELECT id, session_id, status FROM prompts")
    runs = rows(measured.url, "SELECT prompt_id, context_tokens, max_abs_logit_error FROM measurement_runs")
    retrievals = rows(measured.url, "SELECT prompt_id, memory_id FROM memory_retrievals")
    session_of = {prompt["id"]: prompt["session_id"] for prompt in prompts}

    found = {row["session_id"]: row for row in rows(measured.url, "SELECT * FROM icl_analytics.session_summary")}

    assert set(found) == {*measured.sessions.values(), None}
    for session_id, row in found.items():
        in_session = [prompt for prompt in prompts if prompt["session_id"] == session_id]
        session_runs = [run for run in runs if session_of[run["prompt_id"]] == session_id]
        assert row["prompts"] == len(in_session)
        assert row["done"] == sum(prompt["status"] == "done" for prompt in in_session)
        assert row["failed"] == sum(prompt["status"] == "failed" for prompt in in_session)
        assert row["runs"] == len(session_runs)
        assert row["context_tokens"] == sum(run["context_tokens"] for run in session_runs)
        assert row["max_abs_logit_error"] == pytest.approx(max(run["max_abs_logit_error"] for run in session_runs))
        assert row["distinct_memories"] == len({retrieval["memory_id"] for retrieval in retrievals
                                                if session_of[retrieval["prompt_id"]] == session_id})
    assert found[measured.sessions["evening"]]["failed"] == 1


def test_exactness_by_day_and_least_exact_runs(measured):
    runs = rows(measured.url, "SELECT id, max_abs_logit_error, exactness_kl FROM measurement_runs")
    (day,) = rows(measured.url, query("exactness_by_day"), {"since": LONG_AGO})
    worst = rows(measured.url, query("least_exact_runs"), {"since": LONG_AGO, "limit": 3})

    assert day["runs"] == len(runs) == len(measured.prompt_ids)
    assert day["max_abs_logit_error"] == pytest.approx(max(run["max_abs_logit_error"] for run in runs))
    assert day["max_exactness_kl"] == pytest.approx(max(run["exactness_kl"] for run in runs))
    assert [row["run_id"] for row in worst] == [run["id"] for run in sorted(runs, key=lambda run: -run["max_abs_logit_error"])][:3]
    # the tiny model in float32: the patch reproduces the logits
    assert day["max_abs_logit_error"] < 1e-4


def test_queue_view_counts_prompts_by_status(measured):
    found = {row["status"]: row["prompts"] for row in rows(measured.url, "SELECT * FROM icl_analytics.queue")}

    assert found == {"done": len(measured.prompt_ids), "failed": 1}


# --- every query in sql/ runs


EXAMPLE_PARAMETERS = {
    "saturation_by_layer": lambda measured: {"model": measured.model, "since": LONG_AGO},
    "run_saturation": lambda measured: {"run_id": first_run(measured.url)},
    "memories_by_impact": lambda measured: {"model": measured.model},
    "impact_agreement": lambda measured: {"model": measured.model},
    "memory_layers": lambda measured: {"memory_id": measured.memory_ids["pet"], "model": measured.model},
    "layers_absorbing_context": lambda measured: {"model": measured.model, "since": LONG_AGO},
    "recent_sessions": lambda measured: {"limit": 10},
    "session_memories": lambda measured: {"session_id": measured.sessions["morning"]},
    "exactness_by_day": lambda measured: {"since": LONG_AGO},
    "least_exact_runs": lambda measured: {"since": LONG_AGO, "limit": 10},
}


def first_run(url: str) -> int:
    return rows(url, "SELECT min(id) AS id FROM measurement_runs")[0]["id"]


def test_every_query_in_sql_runs_and_finds_rows(measured):
    queries = load_analytics_queries(SQL_DIRECTORY)
    assert set(queries) == set(EXAMPLE_PARAMETERS), "a query in sql/ without example parameters here"

    for name, (sql, names) in queries.items():
        parameters = EXAMPLE_PARAMETERS[name](measured)
        assert set(names) == set(parameters), name
        found = rows(measured.url, sql, parameters)
        assert found, name


def _psql(url: str, variables: dict, *, file=None, text=None) -> subprocess.CompletedProcess:
    options = [f"--variable={name}={value}" for name, value in variables.items()]
    return subprocess.run(["psql", "--no-psqlrc", "--csv", "--variable=ON_ERROR_STOP=1", *options,
                           f"--file={file or '-'}", url], input=text, capture_output=True, text=True, timeout=60)


def _same(psql_cell: str, value) -> bool:
    if value is None:
        return psql_cell == ""
    if isinstance(value, (int, float, decimal.Decimal)) and not isinstance(value, bool):
        return math.isclose(float(psql_cell), float(value), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(value, datetime.datetime):
        return psql_cell.startswith(value.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S"))
    return psql_cell == (str(value).lower() if isinstance(value, bool) else str(value))[: len(psql_cell)]


def test_every_file_in_sql_runs_in_psql_as_written_and_answers_as_python_does(measured):
    """psql -v ... -f sql/FILE runs every query of the file; each query's rows in psql are Python's rows."""
    for path in sorted(SQL_DIRECTORY.glob("*.sql")):
        queries = parse_queries(path.read_text(encoding="utf-8"), path.name)
        variables = {}
        for name in queries:
            variables.update({key: (value.isoformat() if isinstance(value, datetime.datetime) else value)
                              for key, value in EXAMPLE_PARAMETERS[name](measured).items()})
        whole = _psql(measured.url, variables, file=path)
        assert whole.returncode == 0 and not whole.stderr, f"{path.name}: {whole.stderr}"
        for name, text in queries.items():
            ran = _psql(measured.url, variables, text="SET TIME ZONE 'UTC';\n" + text)
            assert ran.returncode == 0, f"{name}: {ran.stderr}"
            header, *psql_rows = list(csv.reader(io.StringIO(ran.stdout.split("\n", 1)[1])))
            expected = rows(measured.url, psql_to_psycopg(text)[0], EXAMPLE_PARAMETERS[name](measured))
            assert header == list(expected[0]), name
            assert len(psql_rows) == len(expected), name
            for psql_row, python_row in zip(psql_rows, expected, strict=True):
                for cell, (column, value) in zip(psql_row, python_row.items(), strict=True):
                    assert _same(cell, value), f"{name}.{column}: psql {cell!r}, Python {value!r}"


def test_icldaemon_query_prints_a_named_query(measured):
    environment = {**os.environ, "ICLD_DATABASE_URL": measured.url}
    command = [sys.executable, "-m", "icldaemon", "query"]
    listing = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert "least_exact_runs  -v since=... -v limit=..." in listing.stdout.splitlines()

    printed = subprocess.run([*command, "least_exact_runs", "-v", "since=2000-01-01", "-v", "limit=3", "--csv"],
                             env=environment, capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    header, *found = list(csv.reader(io.StringIO(printed.stdout)))
    expected = rows(measured.url, query("least_exact_runs"), {"since": LONG_AGO, "limit": 3})
    assert header == list(expected[0]) and [int(row[0]) for row in found] == [row["run_id"] for row in expected]

    table = subprocess.run([*command, "run_saturation", "-v", f"run_id={first_run(measured.url)}"],
                           env=environment, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    layers = rows(measured.url, query("run_saturation"), {"run_id": first_run(measured.url)})
    assert table.stdout.splitlines()[0].split() == list(layers[0])
    assert len(table.stdout.splitlines()) == 1 + len(layers) and table.stderr == f"({len(layers)} rows)\n"

    for arguments, message in ((["run_saturation"], "query run_saturation needs -v run_id=..."),
                               (["run_saturation", "-v", "run_id=1", "-v", "model=x"], "has no variable model"),
                               (["no_such_query"], "no analytics query 'no_such_query'"),
                               (["run_saturation", "-v", "run_id=seven"], "invalid input syntax")):
        failed = subprocess.run([*command, *arguments], env=environment, capture_output=True, text=True, timeout=120)
        assert failed.returncode == 1 and failed.stdout == "", arguments
        assert len(failed.stderr.splitlines()) == 1 and message in failed.stderr, failed.stderr


def test_every_file_in_sql_says_what_question_it_answers():
    for path in sorted(SQL_DIRECTORY.glob("*.sql")):
        opening = path.read_text(encoding="utf-8").split("-- name:")[0]
        assert "?" in opening and opening.lstrip().startswith("--"), path.name
