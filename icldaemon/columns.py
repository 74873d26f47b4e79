"""The log's column contract: the quantities measured per (layer, context token), in their stored order.

The engine computes one [num_layers, context_tokens] array per name (`Measurement.dynamics`), the
store writes each as a float32 array column of icl_dynamics_layers and the view icl_dynamics_log
unnests it. The SQLAlchemy model, the writer's COPY and the view are built from this tuple
(tests/unit/test_layers.py checks); the engine's measure.py computes each quantity under its name, and
plots.py and report.py name the ones they draw and print. Torch-free and database-free, so both sides
import it. Adding a quantity: its computation in the engine, an entry here, a migration, and the views
that show it (README, "Adding a measured quantity").
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Quantity:
    name: str  # the column's name, in icl_dynamics_layers and icl_dynamics_log
    meaning: str  # in the notation of docs/method.md §3


DYNAMICS = (
    Quantity("delta_norm", "||delta_i||: how far prefix i moved the MLP's input at the query"),
    Quantity("update_frobenius_norm", "||dW_i||_F: the rank-1 weight patch equivalent to prefix i"),
    Quantity("marginal_update_norm", "||dW_i - dW_j||_F, j the previous measured prefix (dW_0 = 0)"),
    Quantity("cumulative_update_norm", "running sum of the marginal norms: the implicit descent's path length"),
    Quantity("implicit_learning_rate", "1 / ||a~_i||^2"),
    Quantity("bias_update_norm", "||db_i||: the bias patch"),
)
DYNAMICS_NAMES = tuple(quantity.name for quantity in DYNAMICS)
