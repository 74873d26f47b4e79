"""What a measurement returns: plain numpy arrays and numbers, no tensors."""

from dataclasses import dataclass, field

import numpy as np

# The definition of prefix i and of "C without Y" that produced a measurement (docs/method.md §5).
# 1: the query kept its position in the whole prompt, removed tokens left a gap in the positions.
# 2: every run is a prompt that could be sent: the query follows the kept tokens, removal closes up.
# 3: as 2, and a raw prompt's anchor is BOS even where the tokenizer does not add it (the first word
#    where it has none), so that the context starts at the prompt's first word.
METHOD_VERSION = 3


@dataclass
class TokenInfo:
    index: int  # index among the context tokens
    position: int  # index in the whole prompt
    text: str
    segment: str
    memory_id: int | None = None


@dataclass
class Ablation:
    """The exact patch for removing one part Y of the context, at the query position, per layer."""

    delta: np.ndarray  # [num_layers, d_model]  a - a~
    a_tilde: np.ndarray  # [num_layers, d_model]  MLP input without Y (the patched run's)
    bias_delta: np.ndarray  # [num_layers, d_model]  m - m~
    update_frobenius_norm: np.ndarray  # [num_layers]
    kl: float  # KL(p(.|C) || p(.|C without Y)) at the query, nats
    max_abs_logit_error: float  # patched run vs full run
    patched_kl: float  # KL(p(.|C) || p(.|C without Y, patched))

    @property
    def delta_norm(self) -> np.ndarray:
        return np.linalg.norm(self.delta, axis=-1)

    @property
    def bias_update_norm(self) -> np.ndarray:
        return np.linalg.norm(self.bias_delta, axis=-1)

    @property
    def implicit_learning_rate(self) -> np.ndarray:
        return 1.0 / np.square(np.linalg.norm(self.a_tilde.astype(np.float64), axis=-1))


@dataclass
class SegmentAttribution:
    label: str
    kind: str
    start: int
    end: int
    memory_id: int | None
    key: str | None
    ablation: Ablation

    def to_json(self) -> dict:
        return {
            "label": self.label,
            "kind": self.kind,
            "start": self.start,
            "end": self.end,
            "memory_id": self.memory_id,
            "key": self.key,
            "kl": self.ablation.kl,
            "update_frobenius_norm": self.ablation.update_frobenius_norm.tolist(),
            "bias_update_norm": self.ablation.bias_update_norm.tolist(),
            "delta_norm": self.ablation.delta_norm.tolist(),
            "implicit_learning_rate": self.ablation.implicit_learning_rate.tolist(),
            "exactness": {"max_abs_logit_error": self.ablation.max_abs_logit_error, "kl": self.ablation.patched_kl},
            "factors": {"delta": self.ablation.delta.tolist(), "a_tilde": self.ablation.a_tilde.tolist(),
                        "bias_delta": self.ablation.bias_delta.tolist()},
        }


@dataclass
class Measurement:
    input_ids: list[int]
    anchor_tokens: int
    query_position: int
    tokens: list[TokenInfo]
    dynamics: dict[str, np.ndarray]  # name -> [num_layers, context_tokens], NaN where a prefix was skipped
    measured_prefixes: list[int]  # context token counts measured, ascending
    context_ablation: Ablation  # Y = the whole context
    segments: list[SegmentAttribution]
    model: dict
    timings: dict = field(default_factory=dict)
    method_version: int = METHOD_VERSION
    anchor_text: str = ""  # the anchor's tokens decoded: BOS, the chat template's opening, or the first word
    # log p(. | C) at the query, float64 [vocab]: kept for checks, not written anywhere
    log_probs: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_layers(self) -> int:
        return next(iter(self.dynamics.values())).shape[0]

    @property
    def exactness(self) -> dict:
        ablations = [self.context_ablation, *(segment.ablation for segment in self.segments)]
        return {
            "max_abs_logit_error": max(ablation.max_abs_logit_error for ablation in ablations),
            "kl": max(ablation.patched_kl for ablation in ablations),
        }

    def to_json(self) -> dict:
        def finite_or_none(values: np.ndarray) -> list:
            return [[None if np.isnan(value) else float(value) for value in row] for row in values]

        return {
            "method_version": self.method_version,
            "input_ids": list(self.input_ids),
            "anchor_tokens": self.anchor_tokens,
            "anchor_text": self.anchor_text,
            "query_position": self.query_position,
            "tokens": [vars(token) for token in self.tokens],
            "dynamics": {name: finite_or_none(values) for name, values in self.dynamics.items()},
            "measured_prefixes": list(self.measured_prefixes),
            "segments": [segment.to_json() for segment in self.segments],
            "context": {
                "kl": self.context_ablation.kl,
                "exactness": {
                    "max_abs_logit_error": self.context_ablation.max_abs_logit_error,
                    "kl": self.context_ablation.patched_kl,
                },
            },
            "exactness": self.exactness,
            "timings": dict(self.timings),
            "model": dict(self.model),
        }
