"""Pictures of a measurement: per-token curves for chosen layers and a layer x token heatmap.

`plot_measurement` draws an engine result (`icldaemon measure --plot`), `plot_run` a run read back from
the database (`icldaemon plot RUN_ID`); both draw the same figure.
"""

import datetime
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import matplotlib

matplotlib.use("Agg")  # files only: the daemon and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from icldaemon.exceptions import BadInputError  # noqa: E402

if TYPE_CHECKING:
    from icldaemon.engine.result import Measurement
    from icldaemon.store.runs import RunDynamics

CURVES = (
    ("delta_norm", "||delta|| (context vector)"),
    ("update_frobenius_norm", "||dW||_F (update norm)"),
    ("cumulative_update_norm", "cumulative update (path length)"),
    ("implicit_learning_rate", "implicit learning rate 1/||a~||^2"),
)
MAX_TICK_LABELS = 60  # token texts on the heatmap's axis; a longer context labels every k-th token
FIGURE_SIZE = (15, 10)  # inches
DPI = 110  # dots per inch


class Token(Protocol):
    index: int
    text: str
    segment: str | None


def default_layers(num_layers: int) -> list[int]:
    return sorted({0, num_layers // 4, num_layers // 2, (3 * num_layers) // 4, num_layers - 1})


def segment_boundaries(tokens: Sequence[Token]) -> list[int]:
    """The context token indices at which a new segment (a memory, the text between) begins."""
    return [token.index for previous, token in zip(tokens, tokens[1:]) if token.segment != previous.segment]


def tick_label(text: str) -> str:
    return text.replace("\n", "\\n").replace("\t", "\\t") or " "


def plot_dynamics(
    dynamics: Mapping[str, np.ndarray],
    tokens: Sequence[Token],
    path: str | Path,
    *,
    layers: list[int] | None = None,
    title: str | None = None,
) -> Path:
    """Write the figure: one panel per quantity in CURVES (a line per chosen layer), and the update norm's heatmap."""
    num_layers, num_tokens = dynamics["update_frobenius_norm"].shape
    layers = layers if layers is not None else default_layers(num_layers)
    outside = [layer_idx for layer_idx in layers if not 0 <= layer_idx < num_layers]
    if outside:
        raise BadInputError(f"layers {outside} do not exist; the model has layers 0 to {num_layers - 1}")
    token_indices = np.arange(num_tokens)
    boundaries = segment_boundaries(tokens)
    figure = plt.figure(figsize=FIGURE_SIZE, constrained_layout=True)
    if title:
        figure.suptitle(title)
    grid = figure.add_gridspec(3, 2)
    for index, (name, curve_title) in enumerate(CURVES):
        axes = figure.add_subplot(grid[index // 2, index % 2])
        values = dynamics[name]
        for layer_idx in layers:
            measured = ~np.isnan(values[layer_idx])
            axes.plot(token_indices[measured], values[layer_idx][measured], label=f"layer {layer_idx}")
        for boundary in boundaries:
            axes.axvline(boundary - 0.5, color="grey", linestyle=":", linewidth=0.7)
        axes.set_title(curve_title)
        axes.set_xlabel("context token")
        if name == "implicit_learning_rate":
            axes.set_yscale("log")
        axes.legend(fontsize=7)
    heatmap = figure.add_subplot(grid[2, :])
    image = heatmap.imshow(dynamics["update_frobenius_norm"], aspect="auto", interpolation="nearest", cmap="viridis")
    figure.colorbar(image, ax=heatmap, label="||dW||_F")
    heatmap.set_ylabel("layer")
    heatmap.yaxis.set_major_locator(MaxNLocator(integer=True))
    heatmap.set_title("update norm, layer x context token (segment boundaries dashed)")
    for boundary in boundaries:
        heatmap.axvline(boundary - 0.5, color="white", linestyle="--", linewidth=0.8)
    step = -(-len(tokens) // MAX_TICK_LABELS)  # ceiling division: every token when they fit
    labelled = tokens[::step]
    heatmap.set_xticks([token.index for token in labelled], [tick_label(token.text) for token in labelled],
                       rotation=90, fontsize=7)
    heatmap.set_xlabel("context token" if step == 1 else f"context token (one in {step} labelled)")
    path = Path(path)
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path


def plot_measurement(measurement: "Measurement", path: str | Path, layers: list[int] | None = None) -> Path:
    title = f"{measurement.model.get('name', 'model')}: {len(measurement.tokens)} context tokens"
    return plot_dynamics(measurement.dynamics, measurement.tokens, path, layers=layers, title=title)


def plot_run(run: "RunDynamics", path: str | Path, layers: list[int] | None = None) -> Path:
    title = (f"run {run.run_id} (prompt {run.prompt_id}), {run.model}, {len(run.tokens)} context tokens, "
             f"measured {run.created_at.astimezone(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    return plot_dynamics(run.dynamics, run.tokens, path, layers=layers, title=title)
