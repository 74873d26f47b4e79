"""Static patches (DESIGN.md §1, eq. 11): many rank-1 patches of one memory become one low-rank patch.

For one layer with K patches, D = [delta_k] and A = [a~_k] (d_model x K each), the ridge solution of
min_R sum_k ||R a~_k - delta_k||^2 + lambda ||R||^2 is R = D (A^T A + lambda I)^-1 A^T, a d x d matrix
of rank <= K, and the weight patch is M = W R. Nothing of size d_ff x d (or even d x d) is formed: R is
factored through the QR decompositions of D and A, and its rank-r truncation R ~ P Q^T comes from the
SVD of a K x K core. As a LoRA adapter on each first dense layer: lora_A = Q^T, lora_B = W P, and the
static bias patch (the mean of the patches' db) as the down projection's LoRA bias.

`apply_static_patch` applies the same patch with hooks, at the query position only or at every
position; the LoRA adapter that `export_lora` writes is the every-position form.
"""

import json
import math
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from icldaemon.engine.adapters import ArchitectureAdapter, adapter_for, dense_without_bias
from icldaemon.engine.hooks import Tap, tapped
from icldaemon.engine.measure import _kl, _RecordQuery
from icldaemon.engine.prompt import SegmentedPrompt
from icldaemon.exceptions import BadInputError, NumericalError, UnsupportedArchitectureError

RIDGE = 0.1  # lambda as a share of the mean ||a~||^2: scale-free across layers and models
MAX_CONDITION = 1e12  # largest condition number of A^T A + lambda I that is solved
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
METADATA_FILE = "icldaemon.json"


@dataclass
class PatchSet:
    """K exact patches of one memory (or group), each at its own query: the rank-1 factors per layer."""

    delta: np.ndarray  # [K, num_layers, d_model]
    a_tilde: np.ndarray  # [K, num_layers, d_model]
    bias_delta: np.ndarray  # [K, num_layers, d_model]

    def __post_init__(self):
        shapes = {self.delta.shape, self.a_tilde.shape, self.bias_delta.shape}
        if len(shapes) != 1 or self.delta.ndim != 3:
            raise BadInputError(f"patch factors must share one shape [patches, layers, d_model], got {sorted(shapes)}")

    @property
    def count(self) -> int:
        return self.delta.shape[0]

    def select(self, index: Sequence[int]) -> "PatchSet":
        index = list(index)
        return PatchSet(self.delta[index], self.a_tilde[index], self.bias_delta[index])


@dataclass
class StaticPatch:
    """Per layer, R ~ left @ right^T (d_model x d_model, rank r) and a bias patch on the MLP output."""

    left: np.ndarray  # [num_layers, d_model, rank]  P (singular values folded in)
    right: np.ndarray  # [num_layers, d_model, rank]  Q
    bias: np.ndarray  # [num_layers, d_model]
    ridge: float
    patch_count: int

    @property
    def rank(self) -> int:
        return self.left.shape[-1]

    @property
    def num_layers(self) -> int:
        return self.left.shape[0]

    def input_delta(self, layer_idx: int, a: np.ndarray) -> np.ndarray:
        """R a: the change of the MLP input direction whose W-image the patch adds (for checks)."""
        return self.left[layer_idx] @ (self.right[layer_idx].T @ a)


def fit_static_patch(patches: PatchSet, rank: int, ridge: float = RIDGE) -> StaticPatch:
    """The ridge least-squares static patch of `patches`, truncated to `rank` by SVD, per layer."""
    if rank < 1:
        raise BadInputError(f"rank must be at least 1, got {rank}")
    if ridge < 0:
        raise BadInputError(f"ridge must not be negative, got {ridge}")
    if patches.count < 1:
        raise BadInputError("no patches to fit")
    for name in ("delta", "a_tilde", "bias_delta"):
        values = getattr(patches, name)
        if not np.isfinite(values).all():
            patch_idx, layer_idx = np.argwhere(~np.isfinite(values))[0][:2]
            raise NumericalError(f"patch {patch_idx} has NaN or inf in its {name} at layer {layer_idx}")
    count, num_layers, d_model = patches.delta.shape
    kept = min(rank, count, d_model)
    left = np.zeros((num_layers, d_model, kept))
    right = np.zeros((num_layers, d_model, kept))
    for layer_idx in range(num_layers):
        deltas = patches.delta[:, layer_idx].astype(np.float64).T  # [d_model, K]
        inputs = patches.a_tilde[:, layer_idx].astype(np.float64).T  # [d_model, K]
        gram = inputs.T @ inputs
        regularised = gram + ridge * np.trace(gram) / count * np.eye(count)
        condition = np.linalg.cond(regularised)
        if not condition < MAX_CONDITION:
            raise NumericalError(
                f"layer {layer_idx}: the patches' inputs are (nearly) linearly dependent (condition number "
                f"{condition:.3g} > {MAX_CONDITION:.0e}); use a ridge above {ridge} or fewer repeated queries"
            )
        q_delta, r_delta = np.linalg.qr(deltas)
        q_input, r_input = np.linalg.qr(inputs)
        core = r_delta @ np.linalg.solve(regularised, r_input.T)  # R = q_delta core q_input^T
        u, singular, vt = np.linalg.svd(core)
        left[layer_idx] = q_delta @ (u[:, :kept] * singular[:kept])
        right[layer_idx] = q_input @ vt[:kept].T
    bias = patches.bias_delta.astype(np.float64).mean(axis=0)
    return StaticPatch(left=left, right=right, bias=bias, ridge=ridge, patch_count=count)


# ---- applying the patch ----------------------------------------------------------------------------


class _StaticPatchTap(Tap):
    """Adds W P Q^T a to every first dense layer's output and the bias patch to the block's output."""

    def __init__(self, patch: StaticPatch, positions: slice | torch.Tensor, dtype, device):
        self.positions = positions
        self.left = torch.as_tensor(patch.left, dtype=dtype, device=device)
        self.right = torch.as_tensor(patch.right, dtype=dtype, device=device)
        self.bias = torch.as_tensor(patch.bias, dtype=dtype, device=device)

    def dense_output(self, layer_idx, dense_idx, module, output, state):
        a = state["a"][:, self.positions]  # [batch, positions, d_model]
        low_rank = (a @ self.right[layer_idx]) @ self.left[layer_idx].T  # R a
        output = output.clone()
        output[:, self.positions] += dense_without_bias(module, low_rank).to(output.dtype)
        return output

    def layer_output(self, layer_idx, hidden_states, state):
        hidden_states = hidden_states.clone()
        hidden_states[:, self.positions] += self.bias[layer_idx].to(hidden_states.dtype)
        return hidden_states


@contextmanager
def apply_static_patch(model: PreTrainedModel, patch: StaticPatch, *, everywhere: bool,
                       adapter: ArchitectureAdapter | None = None):
    """Within the block, the model runs with the static patch at the last position or at every position."""
    adapter = adapter or adapter_for(model)
    if patch.num_layers != adapter.num_layers(model):
        raise BadInputError(f"the patch has {patch.num_layers} layers; the model has {adapter.num_layers(model)}")
    positions = slice(None) if everywhere else slice(-1, None)
    tap = _StaticPatchTap(patch, positions, model.dtype, model.device)
    with tapped(model, adapter, tap):
        yield


# ---- fidelity --------------------------------------------------------------------------------------


@dataclass
class FidelityExample:
    """One held-out query: the prompt with the memories in context, and without them (token ids)."""

    with_ids: list[int]
    without_ids: list[int]
    without_positions: list[int] | None = None  # position ids of without_ids; None: 0, 1, 2, ...


@dataclass
class Fidelity:
    examples: int
    kl_without: float  # mean KL(p(.|C) || p(.|C without the memories))
    kl_adapter_query: float  # the same with the static patch at the query position only
    kl_adapter_all: float  # ... at every position (the LoRA adapter)
    greedy_match_without: float  # share of examples whose greedy next token equals the full context's
    greedy_match_query: float
    greedy_match_all: float

    @property
    def recovered_query(self) -> float:
        return _recovered(self.kl_without, self.kl_adapter_query)

    @property
    def recovered_all(self) -> float:
        return _recovered(self.kl_without, self.kl_adapter_all)


def _recovered(kl_without: float, kl_with: float) -> float:
    """The share of the context's effect (its KL) that the patch recovers: 1 is all, 0 none, < 0 worse."""
    return 1.0 - kl_with / kl_without if kl_without > 0 else math.nan


def without_segments(prompt: SegmentedPrompt, labels: set[str]) -> list[int]:
    """The prompt's token ids with the labelled segments taken out (positions close up, as a re-render)."""
    ids = []
    for segment in prompt.segments:
        if segment.label not in labels:
            ids.extend(prompt.input_ids[segment.start : segment.end])
    return ids


def _last_log_probs(model: PreTrainedModel, ids: list[int], positions: list[int] | None = None) -> torch.Tensor:
    input_ids = torch.tensor([ids], device=model.device)
    position_ids = None if positions is None else torch.tensor([positions], device=model.device)
    # With a cache: without one, transformers reads a jump in position ids as the start of a packed
    # sequence and hides everything before it.
    logits = model(input_ids=input_ids, position_ids=position_ids, past_key_values=DynamicCache(),
                   logits_to_keep=1).logits[0, -1]
    if not torch.isfinite(logits).all():
        raise NumericalError("non-finite logits while measuring an adapter's fidelity")
    return torch.log_softmax(logits.to(torch.float64), dim=-1)


@torch.no_grad()
def measure_fidelity(model: PreTrainedModel, patch: StaticPatch, examples: Sequence[FidelityExample],
                     adapter: ArchitectureAdapter | None = None) -> Fidelity:
    """KL to the full-context prediction without the memories, and with the static patch in both modes."""
    if not examples:
        raise BadInputError("no held-out examples to measure fidelity on")
    adapter = adapter or adapter_for(model)
    kl = {"without": [], "query": [], "all": []}
    match = {"without": [], "query": [], "all": []}
    for example in examples:
        full = _last_log_probs(model, example.with_ids)
        without = (example.without_ids, example.without_positions)
        runs = {"without": _last_log_probs(model, *without)}
        for mode, everywhere in (("query", False), ("all", True)):
            with apply_static_patch(model, patch, everywhere=everywhere, adapter=adapter):
                runs[mode] = _last_log_probs(model, *without)
        for mode, log_probs in runs.items():
            kl[mode].append(max(_kl(full, log_probs), 0.0))
            match[mode].append(float(log_probs.argmax() == full.argmax()))
    return Fidelity(
        examples=len(examples),
        kl_without=float(np.mean(kl["without"])),
        kl_adapter_query=float(np.mean(kl["query"])),
        kl_adapter_all=float(np.mean(kl["all"])),
        greedy_match_without=float(np.mean(match["without"])),
        greedy_match_query=float(np.mean(match["query"])),
        greedy_match_all=float(np.mean(match["all"])),
    )


# ---- the sequential fit, for every position ------------------------------------------------------


class _StopForward(Exception):
    """Raised after the recorded layer: nothing above it is needed."""


class _RecordLayer(Tap):
    """Records the last position's MLP input a and residual m at one layer, then stops the forward pass."""

    def __init__(self, layer_idx: int):
        self.layer_idx = layer_idx
        self.a = self.m = None

    def layer_output(self, layer_idx, hidden_states, state):
        if layer_idx == self.layer_idx:
            self.a = state["a"][0, -1].to(torch.float64).cpu().numpy()
            self.m = (hidden_states[0, -1] - state["mlp_output"][0, -1]).to(torch.float64).cpu().numpy()
            raise _StopForward
        return None


def _record_layer(model, adapter, ids: list[int], layer_idx: int) -> tuple[np.ndarray, np.ndarray]:
    tap = _RecordLayer(layer_idx)
    try:
        with tapped(model, adapter, tap):
            model(input_ids=torch.tensor([ids], device=model.device), past_key_values=DynamicCache())
    except _StopForward:
        pass
    return tap.a, tap.m


@torch.no_grad()
def fit_sequential_static_patch(model: PreTrainedModel, examples: Sequence[FidelityExample], rank: int,
                                ridge: float = RIDGE, adapter: ArchitectureAdapter | None = None) -> StaticPatch:
    """A static patch for every position, fitted layer by layer on what the patched layers below produce.

    Applied at every position, a patch fitted on exact per-query patches also moves the context's
    keys and values, so each layer's query sees inputs the fit never saw. Here layer l is fitted on
    the query's MLP input and residual in the run *without* the memories *with* layers < l already
    patched at every position: delta = a - a', a~ = a', db = m - m' against the full run's a and m
    (DESIGN.md §1, the way MEMIT spreads one edit over several layers). Costs one forward pass per
    layer and example, each stopped after the layer it records.
    """
    adapter = adapter or adapter_for(model)
    if not examples:
        raise BadInputError("no examples to fit on")
    num_layers = adapter.num_layers(model)
    d_model = model.config.hidden_size
    count = len(examples)
    full = []  # per example: the full run's (a, m) at the query, per layer
    for example in examples:
        recorded = _RecordQuery()
        with tapped(model, adapter, recorded):
            model(input_ids=torch.tensor([example.with_ids], device=model.device), past_key_values=DynamicCache())
        full.append([(recorded.a[layer_idx].to(torch.float64).cpu().numpy(),
                      recorded.m[layer_idx].to(torch.float64).cpu().numpy()) for layer_idx in range(num_layers)])
    kept = min(rank, count, d_model)
    patch = StaticPatch(left=np.zeros((num_layers, d_model, kept)), right=np.zeros((num_layers, d_model, kept)),
                        bias=np.zeros((num_layers, d_model)), ridge=ridge, patch_count=count)
    for layer_idx in range(num_layers):
        deltas, inputs, biases = [], [], []
        with apply_static_patch(model, patch, everywhere=True, adapter=adapter):
            for example, recorded in zip(examples, full, strict=True):
                a_patched, m_patched = _record_layer(model, adapter, example.without_ids, layer_idx)
                a_full, m_full = recorded[layer_idx]
                deltas.append(a_full - a_patched)
                inputs.append(a_patched)
                biases.append(m_full - m_patched)
        layer = fit_static_patch(PatchSet(np.stack(deltas)[:, None], np.stack(inputs)[:, None],
                                          np.stack(biases)[:, None]), rank=rank, ridge=ridge)
        patch.left[layer_idx, :, : layer.rank] = layer.left[0]
        patch.right[layer_idx, :, : layer.rank] = layer.right[0]
        patch.bias[layer_idx] = layer.bias[0]
    return patch


# ---- the PEFT LoRA adapter -------------------------------------------------------------------------


def _lora_targets(model: PreTrainedModel, adapter: ArchitectureAdapter, layers: Sequence[int]):
    """(module name, module, role) for every LoRA target: the first dense layers and the down projection."""
    if adapter.mlp_output != adapter.mlp:
        raise UnsupportedArchitectureError(
            f"LoRA export for the {adapter.family} family: its MLP output passes through "
            f"{adapter.mlp_output} before joining the residual, so the bias patch has no LoRA home there"
        )
    targets = []
    for layer_idx in layers:
        prefix = f"{adapter.layers}.{layer_idx}"
        for path in adapter.first_dense:
            targets.append((f"{prefix}.{path}", model.get_submodule(f"{prefix}.{path}"), "dense"))
        targets.append((f"{prefix}.{adapter.down_proj}", model.get_submodule(f"{prefix}.{adapter.down_proj}"), "down"))
    return targets


def _features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of nn.Linear or GPT-2's Conv1D (weight [in, out])."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[0], module.weight.shape[1]
    raise UnsupportedArchitectureError(f"dense layer of type {type(module).__name__} is not supported")


def lora_state_dict(model: PreTrainedModel, patch: StaticPatch, adapter: ArchitectureAdapter | None = None
                    ) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the names PEFT saves them (`base_model.model.<module>.lora_A.weight`)."""
    adapter = adapter or adapter_for(model)
    rank = patch.rank
    tensors = {}
    for name, module, role in _lora_targets(model, adapter, range(patch.num_layers)):
        layer_idx = int(name.removeprefix(f"{adapter.layers}.").split(".")[0])
        in_features, out_features = _features(module)
        key = f"base_model.model.{name}"
        if role == "dense":
            right = torch.as_tensor(patch.right[layer_idx], dtype=torch.float64)  # [d_model, rank]
            left = torch.as_tensor(patch.left[layer_idx], dtype=torch.float64)
            weight_left = dense_without_bias(module, left.T.to(module.weight.dtype)).T  # W P: [out, rank]
            tensors[f"{key}.lora_A.weight"] = right.T.float()
            tensors[f"{key}.lora_B.weight"] = weight_left.float()
            tensors[f"{key}.lora_B.bias"] = torch.zeros(out_features)
        else:
            tensors[f"{key}.lora_A.weight"] = torch.zeros(rank, in_features)
            tensors[f"{key}.lora_B.weight"] = torch.zeros(out_features, rank)
            tensors[f"{key}.lora_B.bias"] = torch.as_tensor(patch.bias[layer_idx]).float()
    return {key: value.detach().cpu().contiguous() for key, value in tensors.items()}


def export_lora(model: PreTrainedModel, patch: StaticPatch, directory: Path, *, base_model: str,
                metadata: dict | None = None, adapter: ArchitectureAdapter | None = None) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` (plus icldaemon.json) into `directory`.

    lora_alpha = r makes PEFT's scaling 1, so the stored tensors are the patch itself.
    """
    from peft import LoraConfig
    from safetensors.torch import save

    adapter = adapter or adapter_for(model)
    targets = _lora_targets(model, adapter, range(patch.num_layers))
    conv1d = any(type(module).__name__ == "Conv1D" for _, module, _ in targets)
    config = LoraConfig(
        r=patch.rank,
        lora_alpha=patch.rank,
        lora_dropout=0.0,
        target_modules=[name for name, _, _ in targets],
        lora_bias=True,
        fan_in_fan_out=conv1d,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    # Serialised in memory and written by Python, so that a failed write (a full disk) is an OSError.
    payload = save(lora_state_dict(model, patch, adapter), metadata={"format": "pt"})
    with open(directory / ADAPTER_WEIGHTS_FILE, "wb") as weights:
        weights.write(payload)
        weights.flush()
        os.fsync(weights.fileno())
    (directory / METADATA_FILE).write_text(json.dumps(metadata or {}, indent=2, sort_keys=True) + "\n")
    return directory
