"""Pictures of a measurement: per-token curves for chosen layers and a layer x token heatmap."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: the daemon and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from icldaemon.engine.result import Measurement  # noqa: E402

CURVES = (
    ("delta_norm", "||delta|| (context vector)"),
    ("update_frobenius_norm", "||dW||_F (update norm)"),
    ("cumulative_update_norm", "cumulative update (path length)"),
    ("implicit_learning_rate", "implicit learning rate 1/||a~||^2"),
)
MAX_TICK_LABELS = 60  # token texts on the heatmap's axis when the context is this short or shorter


def default_layers(num_layers: int) -> list[int]:
    return sorted({0, num_layers // 4, num_layers // 2, (3 * num_layers) // 4, num_layers - 1})


def plot_measurement(measurement: Measurement, path: str | Path, layers: list[int] | None = None) -> Path:
    layers = layers or default_layers(measurement.num_layers)
    tokens = np.arange(len(measurement.tokens))
    figure = plt.figure(figsize=(15, 10), constrained_layout=True)
    grid = figure.add_gridspec(3, 2)
    for index, (name, title) in enumerate(CURVES):
        axes = figure.add_subplot(grid[index // 2, index % 2])
        values = measurement.dynamics[name]
        for layer_idx in layers:
            measured = ~np.isnan(values[layer_idx])
            axes.plot(tokens[measured], values[layer_idx][measured], label=f"layer {layer_idx}")
        axes.set_title(title)
        axes.set_xlabel("context token")
        if name == "implicit_learning_rate":
            axes.set_yscale("log")
        axes.legend(fontsize=7)
    heatmap = figure.add_subplot(grid[2, :])
    image = heatmap.imshow(measurement.dynamics["update_frobenius_norm"], aspect="auto", interpolation="nearest",
                           cmap="viridis")
    figure.colorbar(image, ax=heatmap, label="||dW||_F")
    heatmap.set_ylabel("layer")
    heatmap.set_title("update norm, layer x context token (segment boundaries dashed)")
    previous = None
    for token in measurement.tokens:
        if previous is not None and token.segment != previous:
            heatmap.axvline(token.index - 0.5, color="white", linestyle="--", linewidth=0.8)
        previous = token.segment
    if len(measurement.tokens) <= MAX_TICK_LABELS:
        heatmap.set_xticks(tokens, [token.text for token in measurement.tokens], rotation=90, fontsize=7)
    else:
        heatmap.set_xlabel("context token")
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
