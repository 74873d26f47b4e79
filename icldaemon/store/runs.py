"""Reading one measurement run back from the database: its per-layer, per-token dynamics as arrays."""

import datetime
from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg.rows import dict_row

from icldaemon.exceptions import BadInputError
from icldaemon.store.database import translate_errors
from icldaemon.store.queries import load_queries
from icldaemon.store.queue import connection_url
from icldaemon.store.writer import DYNAMICS_NAMES

QUERIES = load_queries()


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
