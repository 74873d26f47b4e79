"""A readable summary of one measurement."""

import numpy as np

from icldaemon.engine.result import Measurement


def _bar(value: float, largest: float, width: int = 24) -> str:
    filled = 0 if largest <= 0 else round(width * value / largest)
    return "#" * filled + "." * (width - filled)


def saturation_token(cumulative: np.ndarray, share: float = 0.9) -> int | None:
    """The first context token at which a layer's path length reaches `share` of its final value."""
    finite = np.where(np.isnan(cumulative), -np.inf, cumulative)
    if not np.isfinite(finite).any() or finite.max() <= 0:
        return None
    return int(np.argmax(finite >= share * finite.max()))


def _timing_line(timings: dict) -> str:
    plain = timings.get("plain_forward_s")
    if not plain:
        return f"time: {timings['measure_s']:.2f} s"
    return (f"time: {timings['measure_s']:.2f} s, {timings['measure_s'] / plain:.1f}x one plain forward pass "
            f"({plain:.3f} s, warm, fastest of the passes timed after the measurement)")


def summary_lines(measurement: Measurement) -> list[str]:
    model, timings, exactness = measurement.model, measurement.timings, measurement.exactness
    n = len(measurement.tokens)
    lines = [
        f"model {model['name']} ({model['family']}, {model['num_layers']} layers, {model['dtype']}, {model['device']})",
        f"prompt {len(measurement.input_ids)} tokens: {measurement.anchor_tokens} anchor {measurement.anchor_text!r}, "
        f"{n} context from {measurement.tokens[0].text!r}, {len(measurement.input_ids) - measurement.query_position} "
        f"query; {len(measurement.measured_prefixes)} prefixes measured",
        f"exactness: max |logit error| {exactness['max_abs_logit_error']:.2e}, KL {exactness['kl']:.2e}",
        _timing_line(timings),
        f"whole context: KL(with || without) at the query {measurement.context_ablation.kl:.4f} nats",
        "",
        "layer  ||dW|| after the whole context   path length  saturates (90%) at token",
    ]
    final = measurement.dynamics["update_frobenius_norm"][:, -1]
    cumulative = measurement.dynamics["cumulative_update_norm"]
    for layer_idx in range(measurement.num_layers):
        at = saturation_token(cumulative[layer_idx])
        where = "-" if at is None else f"{at} {measurement.tokens[at].text!r}"
        lines.append(f"{layer_idx:5d}  {final[layer_idx]:9.4f} {_bar(final[layer_idx], np.nanmax(final))}"
                     f"  {cumulative[layer_idx, -1]:11.4f}  {where}")
    if measurement.segments:
        lines += ["", "segment              tokens   KL(nats)  mean ||dW||  mean ||db||  patch error"]
        for segment in measurement.segments:
            ablation = segment.ablation
            lines.append(
                f"{segment.label[:20]:20s} {segment.end - segment.start:6d}  {ablation.kl:9.4f}  "
                f"{ablation.update_frobenius_norm.mean():11.4f}  {ablation.bias_update_norm.mean():11.4f}  "
                f"{ablation.max_abs_logit_error:.1e}"
            )
    return lines
