"""The log at scale: float32 arrays per (run, layer), per-run columns once per run, icl_dynamics_log a view.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25

`icl_dynamics_log` was a table of one row per (run, layer, context token), about 223 bytes a row, half of
them repeating what is the same for the whole run, the six quantities as float8 where the measurement
carries float32. It becomes a view with the same columns, in the same order and of the same types, over:

- `icl_dynamics_layers`: one row per (run, layer), the six quantities as `real[]` over the run's
  context tokens (entry i is context token i), stored out of line without compression;
- `icl_dynamics_tokens`: one row per run, the context tokens' position, text, segment and memory;
- `measurement_runs` (model, prompt id and, new here, `prompt_hash`) and `prompts` (session id).

Both tables are partitioned by month of `created_at`, with the old table's partitions' bounds, so
that the retention still drops whole partitions. `icl_analytics.run_layers` reads the arrays directly
(CREATE OR REPLACE keeps its grants); its answers are those of revision 0005's text on the same values.

The upgrade converts every row: the quantities are rounded to float32 (what the measurement carries);
a run's rows all take the run's earliest `created_at` (the writer gave them one); the token columns are
taken from the run's lowest layer (the writer wrote the same for every layer); the run columns come
from `measurement_runs` and `prompts` (rows whose run was deleted keep their numbers and tokens, not
the run's columns). Rows the writer never writes (a layer of a run that lacks a context token or
repeats one, or layers of one run over different tokens) stop the upgrade with the runs named, and
nothing changes. The downgrade restores revision 0006's table from the view, row for row (run
`icldaemon roles` again afterwards: the restored table and view are new objects to grant).
"""

import importlib
import re
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from icldaemon.exceptions import DatabaseError

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMPTZ = sa.DateTime(timezone=True)
BRIN_PAGES_PER_RANGE = 8  # pages of the restored icl_dynamics_log per BRIN summary, as in revision 0001
DYNAMICS_COLUMNS = ("delta_norm", "update_frobenius_norm", "marginal_update_norm", "cumulative_update_norm",
                    "implicit_learning_rate", "bias_update_norm")
OLD_TABLE = "icl_dynamics_log_0006"  # the table of revision 0006 while its rows are converted or restored
MONTHLY = re.compile(r"^icl_dynamics_(log|layers)_y\d{4}m\d{2}$")
IRREGULAR_RUNS_SHOWN = 5

LOG_VIEW = """
CREATE VIEW icl_dynamics_log AS
SELECT layers.run_id,
       runs.prompt_id,
       prompts.session_id,
       runs.prompt_hash,
       runs.model,
       layers.layer_idx,
       generate_subscripts(layers.delta_norm, 1) - 1 AS token_idx,
       unnest(tokens.token_position) AS token_position,
       unnest(tokens.token_text) AS token_text,
       unnest(tokens.segment) AS segment,
       unnest(tokens.memory_id) AS memory_id,
       unnest(layers.delta_norm)::double precision AS delta_norm,
       unnest(layers.update_frobenius_norm)::double precision AS update_frobenius_norm,
       unnest(layers.marginal_update_norm)::double precision AS marginal_update_norm,
       unnest(layers.cumulative_update_norm)::double precision AS cumulative_update_norm,
       unnest(layers.implicit_learning_rate)::double precision AS implicit_learning_rate,
       unnest(layers.bias_update_norm)::double precision AS bias_update_norm,
       layers.created_at
FROM icl_dynamics_layers AS layers
LEFT JOIN icl_dynamics_tokens AS tokens ON tokens.run_id = layers.run_id AND tokens.created_at = layers.created_at
LEFT JOIN measurement_runs AS runs ON runs.id = layers.run_id
LEFT JOIN prompts ON prompts.id = runs.prompt_id
"""

LOG_VIEW_COMMENT = (
    "One row per measurement run, layer and context token (the table of the original brief): the six "
    "quantities of docs/method.md section 3, stored as float32 arrays per run and layer in icl_dynamics_layers, "
    "the tokens once per run in icl_dynamics_tokens, the run's own columns in measurement_runs and prompts."
)

# Revision 0005's definition, per (run, layer) over the arrays: the last measured token and the values
# there, then the tokens where the norms settle, each a pass over the layer's arrays in a lateral subquery
# (the OFFSET 0 keeps the final values computed once per layer, not once per token), instead of windows
# over every row of the log; the share's window is partitioned by the run's columns too (one partition
# per run all the same), so that a filter on the model, the session or the time reaches
# measurement_runs before any array is read.
RUN_LAYERS = """
CREATE OR REPLACE VIEW icl_analytics.run_layers AS
WITH per_layer AS (
    SELECT layers.run_id, layers.layer_idx, measured.measured_tokens, measured.peak_update_norm, final.*,
           settled.path_saturation_token_idx, saturation.saturation_token_idx
    FROM icl_dynamics_layers AS layers
    CROSS JOIN LATERAL (
        SELECT count(*) AS measured_tokens,
               max(value.token_idx) AS final_token_idx,
               max(value.update_frobenius_norm)::double precision AS peak_update_norm
        FROM (SELECT generate_subscripts(layers.update_frobenius_norm, 1) - 1 AS token_idx,
                     unnest(layers.update_frobenius_norm) AS update_frobenius_norm) AS value
        WHERE value.update_frobenius_norm IS NOT NULL
    ) AS measured
    CROSS JOIN LATERAL (
        SELECT layers.update_frobenius_norm[measured.final_token_idx + 1]::double precision AS final_update_norm,
               layers.cumulative_update_norm[measured.final_token_idx + 1]::double precision AS final_path_length,
               layers.bias_update_norm[measured.final_token_idx + 1]::double precision AS final_bias_update_norm,
               layers.delta_norm[measured.final_token_idx + 1]::double precision AS final_delta_norm,
               layers.implicit_learning_rate[measured.final_token_idx + 1]::double precision
                   AS final_implicit_learning_rate
        OFFSET 0
    ) AS final
    CROSS JOIN LATERAL (
        SELECT -- the last measured token at which the update norm was still away from its final value
               max(value.token_idx) FILTER (
                   WHERE abs(value.update_frobenius_norm - final.final_update_norm) > 0.1 * final.final_update_norm
               ) AS last_unsettled_token_idx,
               min(value.token_idx) FILTER (
                   WHERE value.cumulative_update_norm >= (1 - 0.1) * final.final_path_length
               ) AS path_saturation_token_idx
        FROM (SELECT generate_subscripts(layers.update_frobenius_norm, 1) - 1 AS token_idx,
                     unnest(layers.update_frobenius_norm)::double precision AS update_frobenius_norm,
                     unnest(layers.cumulative_update_norm)::double precision AS cumulative_update_norm) AS value
        WHERE value.update_frobenius_norm IS NOT NULL
    ) AS settled
    CROSS JOIN LATERAL (
        SELECT min(value.token_idx) AS saturation_token_idx
        FROM (SELECT generate_subscripts(layers.update_frobenius_norm, 1) - 1 AS token_idx,
                     unnest(layers.update_frobenius_norm) AS update_frobenius_norm) AS value
        WHERE value.update_frobenius_norm IS NOT NULL
          AND value.token_idx > coalesce(settled.last_unsettled_token_idx, -1)
    ) AS saturation
    WHERE measured.measured_tokens > 0
)
SELECT per_layer.run_id,
       runs.model,
       prompts.session_id,
       runs.created_at,
       per_layer.layer_idx,
       runs.num_layers,
       runs.context_tokens,
       per_layer.measured_tokens,
       per_layer.final_update_norm,
       per_layer.final_path_length,
       per_layer.final_bias_update_norm,
       per_layer.final_delta_norm,
       per_layer.final_implicit_learning_rate,
       per_layer.peak_update_norm,
       per_layer.saturation_token_idx,
       (per_layer.saturation_token_idx + 1)::double precision / runs.context_tokens AS saturation_fraction,
       per_layer.path_saturation_token_idx,
       (per_layer.path_saturation_token_idx + 1)::double precision / runs.context_tokens AS path_saturation_fraction,
       per_layer.final_update_norm / nullif(sum(per_layer.final_update_norm) OVER run, 0) AS update_norm_share,
       per_layer.final_bias_update_norm / nullif(sum(per_layer.final_bias_update_norm) OVER run, 0)
           AS bias_update_norm_share,
       runs.method_version
FROM per_layer
JOIN measurement_runs AS runs ON runs.id = per_layer.run_id
JOIN prompts ON prompts.id = runs.prompt_id
WINDOW run AS (PARTITION BY per_layer.run_id, runs.model, prompts.session_id, runs.created_at, runs.num_layers,
               runs.context_tokens, runs.method_version)
"""

# --- converting revision 0006's rows

# Per (run, layer): whether its tokens are exactly 0..n-1, and its quantities as float32 arrays in token order.
CONVERT_LAYERS = f"""
CREATE TEMPORARY TABLE icl_dynamics_converted_layers ON COMMIT DROP AS
SELECT numbered.run_id,
       numbered.layer_idx,
       bool_and(numbered.token_idx = numbered.token_number - 1) AS dense,
       count(*) AS tokens,
       min(numbered.created_at) AS created_at,
       {", ".join(f"array_agg(numbered.{name}::real ORDER BY numbered.token_idx) AS {name}"
                  for name in DYNAMICS_COLUMNS)}
FROM (
    SELECT *, row_number() OVER (PARTITION BY run_id, layer_idx ORDER BY token_idx) AS token_number
    FROM {OLD_TABLE}
) AS numbered
GROUP BY numbered.run_id, numbered.layer_idx
"""

IRREGULAR_RUNS = f"""
SELECT run_id FROM icl_dynamics_converted_layers
GROUP BY run_id
HAVING NOT bool_and(dense) OR min(tokens) <> max(tokens)
ORDER BY run_id
LIMIT {IRREGULAR_RUNS_SHOWN + 1}
"""

RUN_TIMES = """
CREATE TEMPORARY TABLE icl_dynamics_converted_runs ON COMMIT DROP AS
SELECT run_id, min(layer_idx) AS first_layer_idx, min(created_at) AS created_at
FROM icl_dynamics_converted_layers
GROUP BY run_id
"""

INSERT_LAYERS = f"""
INSERT INTO icl_dynamics_layers (run_id, layer_idx, created_at, {", ".join(DYNAMICS_COLUMNS)})
SELECT layers.run_id, layers.layer_idx, runs.created_at, {", ".join(f"layers.{name}" for name in DYNAMICS_COLUMNS)}
FROM icl_dynamics_converted_layers AS layers
JOIN icl_dynamics_converted_runs AS runs USING (run_id)
"""

# The token columns and the prompt hash from each run's lowest layer (a regular run has every token there once).
CONVERT_TOKENS = f"""
CREATE TEMPORARY TABLE icl_dynamics_converted_tokens ON COMMIT DROP AS
SELECT old.run_id,
       min(runs.created_at) AS created_at,
       array_agg(old.token_position ORDER BY old.token_idx) AS token_position,
       array_agg(old.token_text ORDER BY old.token_idx) AS token_text,
       array_agg(old.segment ORDER BY old.token_idx) AS segment,
       array_agg(old.memory_id ORDER BY old.token_idx) AS memory_id,
       min(old.prompt_hash) AS prompt_hash
FROM {OLD_TABLE} AS old
JOIN icl_dynamics_converted_runs AS runs ON runs.run_id = old.run_id AND runs.first_layer_idx = old.layer_idx
GROUP BY old.run_id
"""

INSERT_TOKENS = """
INSERT INTO icl_dynamics_tokens (run_id, created_at, token_position, token_text, segment, memory_id)
SELECT run_id, created_at, token_position, token_text, segment, memory_id
FROM icl_dynamics_converted_tokens
"""

SET_PROMPT_HASHES = """
UPDATE measurement_runs
SET prompt_hash = tokens.prompt_hash
FROM icl_dynamics_converted_tokens AS tokens
WHERE measurement_runs.id = tokens.run_id
"""

MONTHLY_PARTITIONS = """
SELECT child.relname, pg_get_expr(child.relpartbound, child.oid)
FROM pg_inherits
JOIN pg_class AS child ON child.oid = pg_inherits.inhrelid
WHERE pg_inherits.inhparent = %(parent)s::regclass AND NOT child.relpartbound IS NULL
ORDER BY child.relname
"""

# --- restoring them

OLD_COLUMNS = ("run_id", "prompt_id", "session_id", "prompt_hash", "model", "layer_idx", "token_idx",
               "token_position", "token_text", "segment", "memory_id", *DYNAMICS_COLUMNS, "created_at")


def _monthly_partitions(parent: str) -> list[tuple[str, str]]:
    """(name, bound) of `parent`'s monthly partitions, the bound as `FOR VALUES FROM (...) TO (...)`."""
    rows = op.get_bind().exec_driver_sql(MONTHLY_PARTITIONS, {"parent": parent}).fetchall()
    return [(name, bound) for name, bound in rows if MONTHLY.match(name)]


def _create_dynamics_tables() -> None:
    op.create_table(
        "icl_dynamics_layers",
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("layer_idx", sa.Integer(), nullable=False),
        sa.Column("created_at", TIMESTAMPTZ, server_default=sa.text("now()"), nullable=False),
        *(sa.Column(name, postgresql.ARRAY(sa.REAL()), nullable=False) for name in DYNAMICS_COLUMNS),
        sa.PrimaryKeyConstraint("run_id", "layer_idx", "created_at", name=op.f("icl_dynamics_layers_pkey")),
        postgresql_partition_by="RANGE (created_at)",
    )
    # float32 measurements do not compress, and trying costs every write; partitions inherit this
    for name in DYNAMICS_COLUMNS:
        op.execute(f"ALTER TABLE icl_dynamics_layers ALTER COLUMN {name} SET STORAGE EXTERNAL")
    op.create_index("icl_dynamics_layers_created_at_brin", "icl_dynamics_layers", ["created_at"],
                    postgresql_using="brin")
    op.create_table(
        "icl_dynamics_tokens",
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("created_at", TIMESTAMPTZ, server_default=sa.text("now()"), nullable=False),
        sa.Column("token_position", postgresql.ARRAY(sa.Integer()), nullable=False),
        sa.Column("token_text", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("segment", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("memory_id", postgresql.ARRAY(sa.BigInteger()), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "created_at", name=op.f("icl_dynamics_tokens_pkey")),
        postgresql_partition_by="RANGE (created_at)",
    )
    for table in ("icl_dynamics_layers", "icl_dynamics_tokens"):
        op.execute(f"CREATE TABLE {table}_default PARTITION OF {table} DEFAULT")


def upgrade() -> None:
    bind = op.get_bind()
    op.add_column("measurement_runs", sa.Column("prompt_hash", sa.Text(), nullable=True))
    op.execute(f"ALTER TABLE icl_dynamics_log RENAME TO {OLD_TABLE}")
    _create_dynamics_tables()
    for name, bound in _monthly_partitions(OLD_TABLE):
        month = name.removeprefix("icl_dynamics_log_")
        for table in ("icl_dynamics_layers", "icl_dynamics_tokens"):
            op.execute(f"CREATE TABLE {table}_{month} PARTITION OF {table} {bound}")

    bind.exec_driver_sql(CONVERT_LAYERS)
    irregular = [run_id for (run_id,) in bind.exec_driver_sql(IRREGULAR_RUNS)]
    if irregular:
        shown = ", ".join(map(str, irregular[:IRREGULAR_RUNS_SHOWN]))
        shown += ", ..." if len(irregular) > IRREGULAR_RUNS_SHOWN else ""
        raise DatabaseError(
            f"icl_dynamics_log holds runs whose layers do not each cover context tokens 0..n-1 exactly once "
            f"(runs {shown}); the writer never writes such rows. Delete or repair them, then migrate again")
    bind.exec_driver_sql(RUN_TIMES)
    bind.exec_driver_sql(INSERT_LAYERS)
    bind.exec_driver_sql(CONVERT_TOKENS)
    bind.exec_driver_sql(INSERT_TOKENS)
    bind.exec_driver_sql(SET_PROMPT_HASHES)

    op.execute(LOG_VIEW)
    comment = LOG_VIEW_COMMENT.replace("'", "''")
    op.execute(f"COMMENT ON VIEW icl_dynamics_log IS '{comment}'")
    op.execute(RUN_LAYERS)
    op.execute(f"DROP TABLE {OLD_TABLE}")


def downgrade() -> None:
    bind = op.get_bind()
    op.create_table(
        OLD_TABLE,
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("prompt_id", sa.BigInteger(), nullable=True),
        sa.Column("session_id", sa.Uuid(), nullable=True),
        sa.Column("prompt_hash", sa.Text(), nullable=True),
        sa.Column("model", sa.Text(), nullable=True),
        sa.Column("layer_idx", sa.Integer(), nullable=False),
        sa.Column("token_idx", sa.Integer(), nullable=False),
        sa.Column("token_position", sa.Integer(), nullable=True),
        sa.Column("token_text", sa.Text(), nullable=True),
        sa.Column("segment", sa.Text(), nullable=True),
        sa.Column("memory_id", sa.BigInteger(), nullable=True),
        *(sa.Column(name, sa.Double(), nullable=True) for name in DYNAMICS_COLUMNS),
        sa.Column("created_at", TIMESTAMPTZ, server_default=sa.text("now()"), nullable=False),
        postgresql_partition_by="RANGE (created_at)",
    )
    op.execute(f"CREATE TABLE icl_dynamics_log_default PARTITION OF {OLD_TABLE} DEFAULT")
    for name, bound in _monthly_partitions("icl_dynamics_layers"):
        month = name.removeprefix("icl_dynamics_layers_")
        op.execute(f"CREATE TABLE icl_dynamics_log_{month} PARTITION OF {OLD_TABLE} {bound}")
    columns = ", ".join(OLD_COLUMNS)
    bind.exec_driver_sql(f"INSERT INTO {OLD_TABLE} ({columns}) SELECT {columns} FROM icl_dynamics_log")

    op.execute("DROP VIEW icl_dynamics_log")
    op.execute(f"ALTER TABLE {OLD_TABLE} RENAME TO icl_dynamics_log")
    op.create_index("icl_dynamics_log_run_id_brin", "icl_dynamics_log", ["run_id"], postgresql_using="brin",
                    postgresql_with={"pages_per_range": BRIN_PAGES_PER_RANGE})
    op.create_index("icl_dynamics_log_created_at_brin", "icl_dynamics_log", ["created_at"], postgresql_using="brin")
    previous = importlib.import_module("icldaemon.store.migrations.versions.0005_method_version")
    op.execute(previous.RUN_LAYERS)
    op.drop_table("icl_dynamics_tokens")
    op.drop_table("icl_dynamics_layers")
    op.drop_column("measurement_runs", "prompt_hash")
