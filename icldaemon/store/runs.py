"""Reading measurements back: one run's per-layer, per-token dynamics as arrays; a session's summary."""

import datetime
from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg.rows import dict_row

from icldaemon.columns import DYNAMICS_NAMES
from icldaemon.exceptions import BadInputError
from icldaemon.store.database import translate_errors
from icldaemon.store.queries import QUERIES
from icldaemon.store.queue import connection_url


@dataclass(frozen=True)
class RunToken:
    index: int  # index among the context tokens
    text: str
    segment: str | None


@dataclass
class RunDynamics:
    run_id: int
    prompt_id: int
    model: str
    num_layers: int
    stride: int
    max_abs_logit_error: float | None
    created_at: datetime.datetime
    tokens: list[RunToken]
    dynamics: dict[str, np.ndarray]  # name -> [num_layers, context_tokens], NaN where a prefix was skipped


def load_run(connection: psycopg.Connection, run_id: int) -> RunDynamics:
    """The run's rows from icl_dynamics_log as arrays; BadInputError when the run or its rows are missing."""
    with translate_errors(connection_url(connection), f"reading measurement run {run_id}"):
        with connection.cursor(row_factory=dict_row) as cursor:
            run = cursor.execute(QUERIES["measurement_run"], {"run_id": run_id}).fetchone()
            if run is None:
                raise BadInputError(f"measurement run {run_id} does not exist")
            rows = cursor.execute(QUERIES["run_dynamics"], {"run_id": run_id}).fetchall()
    if not rows:
        raise BadInputError(f"measurement run {run_id} has no rows in icl_dynamics_log "
                            f"(dropped by the retention, if it is older than ICLD_RETENTION_DAYS)")
    shape = (run["num_layers"], run["context_tokens"])
    dynamics = {name: np.full(shape, np.nan) for name in DYNAMICS_NAMES}
    tokens: dict[int, RunToken] = {}
    for row in rows:
        for name in DYNAMICS_NAMES:
            if row[name] is not None:
                dynamics[name][row["layer_idx"], row["token_idx"]] = row[name]
        tokens.setdefault(row["token_idx"], RunToken(row["token_idx"], row["token_text"] or "", row["segment"]))
    return RunDynamics(
        run_id=run["id"], prompt_id=run["prompt_id"], model=run["model"], num_layers=run["num_layers"],
        stride=run["stride"], max_abs_logit_error=run["max_abs_logit_error"], created_at=run["created_at"],
        tokens=[tokens[index] for index in sorted(tokens)], dynamics=dynamics,
    )


@dataclass
class SessionReport:
    """What one session's measured prompts show, as the demo prints it (queries in sql/results.sql)."""

    # (prompt_id, kind, context_tokens, num_layers, max_abs_logit_error, exactness_kl, context_kl, measure_s)
    prompts: list[tuple]
    # (memory_id, key, runs, mean_kl, mean_update_norm, mean_bias_update_norm), largest mean KL first
    memories: list[tuple]
    # (layer_idx, final_update_norm, final_bias_update_norm): the mean after the whole context
    layers: list[tuple]


def session_report(connection: psycopg.Connection, session_id) -> SessionReport:
    parameters = {"session_id": session_id}
    with translate_errors(connection_url(connection), f"reading session {session_id}'s results"), \
            connection.transaction():
        return SessionReport(
            prompts=connection.execute(QUERIES["session_prompt_exactness"], parameters).fetchall(),
            memories=connection.execute(QUERIES["session_memory_effects"], parameters).fetchall(),
            layers=connection.execute(QUERIES["session_final_update_norm_by_layer"], parameters).fetchall(),
        )
