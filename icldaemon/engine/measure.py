"""Exact implicit weight updates: per-token dynamics and per-segment attribution (docs/method.md).

One plain forward pass over the prompt records, at the query position x, every layer's input h,
MLP input a, residual m and first-dense output z, and leaves the context's keys and values in a
cache. Every prefix of the context is then measured at once: for prefix i a *full copy* of the query
attends to the anchor and c_1..c_i, and a *hybrid copy* of x attends to the anchor only, with its
layer inputs overwritten from the full copy (the paper's induction). Copies are packed into chunks
against the cached keys, longest prefixes first, the cache cropped to what each chunk may see.
Attribution removes one segment Y (a forward pass over C without Y) and runs three copies of x
against it: hybrid (overwritten from the full run), patched (dW and db applied, nothing overwritten:
the check) and plain (the behavioural effect).

Every run is one a prompt could be: positions are consecutive. The full copy of prefix i sits at
`anchor + i + k` (the query right after c_i), the hybrid copies at `anchor + k` (the query right after
the anchor); C without Y is the prompt with Y's tokens taken out and the rest closed up.

Hybrid models (attention and a Mamba2 mixer, docs/method.md §8) run the same passes with their mixers
in the dual form (state_space.py): the full pass and each ablation's prefill record what the mixers'
copies need, and every copy reads its own prompt off the same 4D mask as attention.
"""

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel

from icldaemon.columns import DYNAMICS_NAMES
from icldaemon.engine.adapters import ArchitectureAdapter, adapter_for, max_positions
from icldaemon.engine.attention import RowBlock, blocked_attention
from icldaemon.engine.dense_factor import dense_factors
from icldaemon.engine.hooks import Tap, tapped
from icldaemon.engine.prompt import SegmentedPrompt
from icldaemon.engine.result import Ablation, Measurement, SegmentAttribution, TokenInfo
from icldaemon.engine.state_space import dual_form
from icldaemon.exceptions import BadInputError, NumericalError

CHUNK_COPIES = 512  # prefixes per chunk of copies; bounds the extra memory of the copies
ROW_BLOCK_COPIES = 64  # prefixes per attention row block: each block sees only the keys it needs
PLAIN_FORWARD_REPEATS = 1  # warm plain passes timed after each measurement, for its cost ratio
REDUCTION_DTYPE = torch.float64  # norms and dot products of differences lose little at this precision


# ---- masks -----------------------------------------------------------------------------------------


@dataclass
class _NewToken:
    position: int  # position id
    cache_limit: int  # attends cache keys [0, cache_limit)
    group: int  # attends earlier new tokens of the same group


def _additive_mask(tokens: list[_NewToken], cache_length: int, window: int | None, dtype, device) -> torch.Tensor:
    """Cached keys sit at positions 0..cache_length-1; the window, where there is one, counts positions."""
    positions = torch.tensor([token.position for token in tokens], device=device)
    limits = torch.tensor([token.cache_limit for token in tokens], device=device)
    groups = torch.tensor([token.group for token in tokens], device=device)
    cache_keys = torch.arange(cache_length, device=device)
    allowed_cache = cache_keys[None, :] < limits[:, None]  # [new, cache]
    order = torch.arange(len(tokens), device=device)
    allowed_new = (groups[:, None] == groups[None, :]) & (order[None, :] <= order[:, None])  # [new, new]
    allowed = torch.cat([allowed_cache, allowed_new], dim=1)
    if window is not None:
        key_positions = torch.cat([cache_keys, positions])
        allowed &= key_positions[None, :] > positions[:, None] - window
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]  # [batch, head, new, cache + new]


def _attention_mask(model: PreTrainedModel, adapter: ArchitectureAdapter, tokens: list[_NewToken],
                    cache_length: int):
    """A custom 4D mask; a mapping per attention kind where the model's layers take several (the adapter's)."""
    dtype, device = model.dtype, model.device
    by_window: dict[int | None, torch.Tensor] = {}
    masks = {}
    for kind, window in adapter.attention_windows(model.config).items():
        if window not in by_window:
            by_window[window] = _additive_mask(tokens, cache_length, window, dtype, device)
        masks[kind] = by_window[window]
    return masks[None] if None in masks else masks


def _crop(cache: DynamicCache, length: int) -> None:
    # the longest layer: in hybrids with attention in some blocks only, the first layers hold nothing
    surplus = max((layer.get_seq_length() for layer in cache.layers), default=0) - length
    if surplus > 0:
        cache.crop(-surplus)


def _forward(model, input_ids, position_ids, cache, attention_mask=None, logits_to_keep=1):
    return model(
        input_ids=input_ids[None],
        position_ids=position_ids[None],
        attention_mask=attention_mask,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=logits_to_keep,
    ).logits[0].to(REDUCTION_DTYPE)


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension from log-probabilities, per row (may round slightly below 0)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _check_finite(name: str, tensor: torch.Tensor, layer_idx: int | None = None) -> None:
    if not torch.isfinite(tensor).all():
        where = f" at layer {layer_idx}" if layer_idx is not None else ""
        raise NumericalError(
            f"non-finite values in {name}{where} (NaN or inf; in float16 this is usually an overflow: use "
            "bfloat16 or float32)"
        )


# ---- the full run ----------------------------------------------------------------------------------


class _RecordQuery(Tap):
    """Records, at the last position, every layer's input h, MLP input a, residual m and dense output z."""

    def __init__(self):
        self.hidden_in, self.a, self.m, self.z = {}, {}, {}, {}
        self.logits: torch.Tensor | None = None

    def layer_input(self, layer_idx, hidden_states):
        self.hidden_in[layer_idx] = hidden_states[0, -1].detach().clone()
        _check_finite("the layer input", self.hidden_in[layer_idx], layer_idx)

    def layer_output(self, layer_idx, hidden_states, state):
        self.a[layer_idx] = state["a"][0, -1].detach().clone()
        self.m[layer_idx] = (hidden_states[0, -1] - state["mlp_output"][0, -1]).detach().clone()
        self.z[layer_idx] = torch.cat([z[0, -1] for z in state["z"]]).detach().clone()
        _check_finite("the MLP input", self.a[layer_idx], layer_idx)


# ---- per-token dynamics ----------------------------------------------------------------------------


class _PrefixCopies(Tap):
    """Overwrites hybrid copies from full copies and reduces both to the dynamics, chunk by chunk."""

    def __init__(self, model, adapter: ArchitectureAdapter):
        num_layers = adapter.num_layers(model)
        self.full_index = self.hybrid_index = self.computed_rows = None
        self.prefixes: list[int] = []  # of the current chunk, descending
        self.values = {name: [dict() for _ in range(num_layers)] for name in DYNAMICS_NAMES}
        # per layer: (prefix, u, v) of the smallest prefix of the previous chunk, awaiting its successor
        self.carry: list[tuple | None] = [None] * num_layers
        # u_i . u_j = (R delta_i) . (R delta_j) (dense_factor.py); without factors, u = W delta itself
        self.factors = dense_factors(model, adapter)
        self.adapter = adapter
        self.dense = [[block.get_submodule(path) for path in adapter.first_dense] for block in adapter.blocks(model)]

    def layer_input(self, layer_idx, hidden_states):
        # in place: the block's input is the previous block's fresh output (or the embeddings), read by
        # nothing else
        hidden_states[0, self.hybrid_index] = hidden_states[0, self.full_index]
        return None

    def mlp_rows(self):
        # a hybrid copy's MLP output is never read (its next layer input is overwritten), and its u is
        # computed from delta below: only the shared query tokens and the full copies run the MLP
        return self.computed_rows

    def duplicate_rows(self):
        # a hybrid copy's layer input is its full copy's: so are its query, key and value projections
        # (rotary positions are applied after them)
        return self.computed_rows, self.hybrid_index, self.full_index

    def _u(self, layer_idx, delta):
        """[copies, k] with u_i . u_j the products of u = W delta (k = d_model with factors, else d_ff)."""
        if self.factors is not None:
            factor = self.factors[layer_idx]
            return (delta.to(factor.dtype) @ factor).to(REDUCTION_DTYPE)
        dense = self.adapter.dense_without_bias
        return torch.cat([dense(module, delta.to(module.weight.dtype)) for module in self.dense[layer_idx]],
                         dim=-1).to(REDUCTION_DTYPE)

    def layer_output(self, layer_idx, hidden_states, state):
        full, hybrid = self.full_index, self.hybrid_index
        vecdot = torch.linalg.vecdot
        a = state["a"][0]
        a_full, a_tilde = a[full].to(REDUCTION_DTYPE), a[hybrid].to(REDUCTION_DTYPE)  # [copies, d_model]
        delta = a_full - a_tilde
        u = self._u(layer_idx, delta)
        m = hidden_states[0] - state["mlp_output"][0]
        bias_delta = (m[full] - m[hybrid]).to(REDUCTION_DTYPE)
        a_tilde_sq, u_sq = vecdot(a_tilde, a_tilde), vecdot(u, u)
        frobenius_sq = u_sq / a_tilde_sq  # ||u v^T||^2 with v = a~ / ||a~||^2
        frobenius = torch.sqrt(frobenius_sq)
        values = {
            "delta_norm": torch.sqrt(vecdot(delta, delta)),
            "update_frobenius_norm": frobenius,
            "implicit_learning_rate": 1.0 / a_tilde_sq,
            "bias_update_norm": torch.sqrt(vecdot(bias_delta, bias_delta)),
        }
        for name, column in values.items():
            self.values[name][layer_idx].update(zip(self.prefixes, column.tolist()))
        # ||u_i v_i^T - u_j v_j^T||_F^2 = |dW_i|^2 + |dW_j|^2 - 2 (u_i.u_j)(v_i.v_j), for consecutive prefixes
        marginal = self.values["marginal_update_norm"][layer_idx]
        if self.carry[layer_idx] is not None:
            prefix, u_prev, a_prev, a_prev_sq, frobenius_prev_sq = self.carry[layer_idx]
            cross = (u_prev @ u[0]) * (a_prev @ a_tilde[0]) / (a_prev_sq * a_tilde_sq[0])
            marginal[prefix] = math.sqrt(max(float(frobenius_prev_sq + frobenius_sq[0] - 2 * cross), 0.0))
        cross = vecdot(u[:-1], u[1:]) * vecdot(a_tilde[:-1], a_tilde[1:]) / (a_tilde_sq[:-1] * a_tilde_sq[1:])
        marginal_sq = frobenius_sq[:-1] + frobenius_sq[1:] - 2 * cross
        marginal.update(zip(self.prefixes[:-1], torch.sqrt(marginal_sq.clamp_min(0)).tolist()))
        # the last copy's successor is in the next chunk (or is the empty prefix, dW_0 = 0)
        marginal[self.prefixes[-1]] = float(frobenius[-1])
        self.carry[layer_idx] = (self.prefixes[-1], u[-1], a_tilde[-1], a_tilde_sq[-1], frobenius_sq[-1])


def measured_prefixes(prompt: SegmentedPrompt, stride: int) -> list[int]:
    """Context token counts to measure: every `stride`-th, every segment boundary, and the whole context."""
    if stride < 1:
        raise BadInputError(f"stride must be at least 1, got {stride}")
    n, anchor = prompt.context_tokens, prompt.anchor_tokens
    chosen = set(range(stride, n + 1, stride)) | {n}
    for segment in prompt.segments[1:-1]:
        chosen |= {segment.start - anchor, segment.end - anchor}
    return sorted(prefix for prefix in chosen if 1 <= prefix <= n)


def _prefix_dynamics(model, adapter, prompt, cache, prefixes, chunk_copies) -> dict[str, np.ndarray]:
    device = model.device
    ids = torch.tensor(prompt.input_ids, device=device)
    anchor, query_len, num_layers = prompt.anchor_tokens, prompt.query_tokens, adapter.num_layers(model)
    query_position = prompt.query_position
    query_ids = ids[query_position:]
    tap = _PrefixCopies(model, adapter)
    descending = sorted(prefixes, reverse=True)
    with tapped(model, adapter, tap):
        for start in range(0, len(descending), chunk_copies):
            chunk = descending[start : start + chunk_copies]
            cache_length = anchor + chunk[0]
            _crop(cache, cache_length)
            tokens, token_ids, full_index, hybrid_index = [], [], [], []
            # the hybrid run's query tokens before x, right after the anchor: the same for every prefix,
            # so shared by the chunk
            for k in range(query_len - 1):
                tokens.append(_NewToken(anchor + k, anchor, group=-1))
                token_ids.append(query_ids[k])
            for copy, prefix in enumerate(chunk):
                for k in range(query_len):
                    tokens.append(_NewToken(anchor + prefix + k, anchor + prefix, group=copy))
                    token_ids.append(query_ids[k])
                full_index.append(len(tokens) - 1)
            for copy in range(len(chunk)):
                tokens.append(_NewToken(anchor + query_len - 1, anchor, group=-1))
                token_ids.append(query_ids[-1])
                hybrid_index.append(len(tokens) - 1)
            mask = _attention_mask(model, adapter, tokens, cache_length)
            _exclude_sibling_hybrids(mask, cache_length, hybrid_index)
            tap.full_index = torch.tensor(full_index, device=device)
            tap.hybrid_index = torch.tensor(hybrid_index, device=device)
            tap.computed_rows = slice(0, hybrid_index[0])  # the shared query tokens and the full copies
            tap.prefixes = chunk
            position_ids = torch.tensor([token.position for token in tokens], device=device)
            plan = _row_blocks(anchor, chunk, query_len, cache_length)
            with blocked_attention(model, plan):
                _forward(model, torch.stack(token_ids), position_ids, cache, mask)
    context_tokens = prompt.context_tokens
    dynamics = {}
    for name in DYNAMICS_NAMES:
        array = np.full((num_layers, context_tokens), np.nan)
        if name != "cumulative_update_norm":
            for layer_idx, by_prefix in enumerate(tap.values[name]):
                for prefix, value in by_prefix.items():
                    array[layer_idx, prefix - 1] = value
        dynamics[name] = array
    order = np.array(sorted(prefixes)) - 1
    dynamics["cumulative_update_norm"][:, order] = np.cumsum(dynamics["marginal_update_norm"][:, order], axis=1)
    return dynamics


def _row_blocks(anchor: int, chunk: list[int], query_len: int, cache_length: int) -> list[RowBlock]:
    """Row blocks of a chunk laid out as [shared hybrid query tokens | full copies | hybrid x copies]."""
    shared = query_len - 1
    full_end = shared + len(chunk) * query_len
    shared_keys = (slice(cache_length, cache_length + shared),) if shared else ()
    blocks = [RowBlock(slice(0, shared), (slice(0, anchor), *shared_keys))] if shared else []
    for first in range(0, len(chunk), ROW_BLOCK_COPIES):
        last = min(first + ROW_BLOCK_COPIES, len(chunk))
        rows = slice(shared + first * query_len, shared + last * query_len)
        own = slice(cache_length + rows.start, cache_length + rows.stop)
        blocks.append(RowBlock(rows, (slice(0, anchor + chunk[first]), own)))  # chunk is in descending order
    hybrid_rows = slice(full_end, full_end + len(chunk))
    hybrid_keys = slice(cache_length + hybrid_rows.start, cache_length + hybrid_rows.stop)
    blocks.append(RowBlock(hybrid_rows, (slice(0, anchor), *shared_keys), own=hybrid_keys))
    return blocks


def _exclude_sibling_hybrids(mask, cache_length: int, hybrid_index: list[int]) -> None:
    """Hybrid copies share a group (to see the shared query tokens) but must not see one another."""
    masks = mask.values() if isinstance(mask, dict) else [mask]
    index = torch.tensor(hybrid_index, device=next(iter(masks)).device)
    for tensor in masks:
        block = tensor[0, 0][index[:, None], cache_length + index[None, :]]
        eye = torch.eye(len(hybrid_index), dtype=torch.bool, device=block.device)
        block.masked_fill_(~eye, torch.finfo(tensor.dtype).min)
        tensor[0, 0][index[:, None], cache_length + index[None, :]] = block


# ---- attribution -----------------------------------------------------------------------------------


class _AblationCopies(Tap):
    """Copy 0 is hybrid (overwritten from the full run), copy 1 is patched, copy 2 is plain."""

    HYBRID, PATCHED = -3, -2

    def __init__(self, full: _RecordQuery, adapter: ArchitectureAdapter, num_layers: int):
        self.full, self.adapter = full, adapter
        self.delta = [None] * num_layers
        self.a_tilde = [None] * num_layers
        self.bias_delta = [None] * num_layers
        self.frobenius = [0.0] * num_layers

    def layer_input(self, layer_idx, hidden_states):
        hidden_states = hidden_states.clone()
        hidden_states[0, self.HYBRID] = self.full.hidden_in[layer_idx]
        if layer_idx == 0:
            # the query's input x is the full prompt's: with absolute position embeddings (GPT-2) the
            # embedding at the closed-up position differs, and the patch is defined for the full run's x
            hidden_states[0, self.PATCHED] = self.full.hidden_in[0]
        return hidden_states

    def dense_output(self, layer_idx, dense_idx, module, output, state):
        a = state["a"][0]
        a_tilde = a[self.HYBRID]
        delta = self.full.a[layer_idx] - a_tilde
        self.delta[layer_idx], self.a_tilde[layer_idx] = delta, a_tilde
        coefficient = (a_tilde.to(REDUCTION_DTYPE) @ a[self.PATCHED].to(REDUCTION_DTYPE)) / (
            a_tilde.to(REDUCTION_DTYPE) @ a_tilde.to(REDUCTION_DTYPE)
        )
        output = output.clone()
        output[0, self.PATCHED] += (self.adapter.dense_without_bias(module, delta) * coefficient).to(output.dtype)
        return output

    def layer_output(self, layer_idx, hidden_states, state):
        z_tilde = torch.cat(state["z"], dim=-1)[0, self.HYBRID]
        m_tilde = hidden_states[0, self.HYBRID] - state["mlp_output"][0, self.HYBRID]
        bias_delta = self.full.m[layer_idx] - m_tilde
        self.bias_delta[layer_idx] = bias_delta
        a_tilde = self.a_tilde[layer_idx].to(REDUCTION_DTYPE)
        self.frobenius[layer_idx] = float(
            torch.linalg.vector_norm((self.full.z[layer_idx] - z_tilde).to(REDUCTION_DTYPE))
            / torch.linalg.vector_norm(a_tilde)
        )
        hidden_states = hidden_states.clone()
        hidden_states[0, self.PATCHED] += bias_delta
        return hidden_states


def _ablate(model, adapter, prompt, full: _RecordQuery, full_log_probs, remove: tuple[int, int]) -> Ablation:
    start, end = remove
    device = model.device
    # C without Y, closed up: the prompt the application would have sent without Y
    ids = torch.tensor(prompt.input_ids[:start] + prompt.input_ids[end:], device=device)
    prefix_length = len(ids) - 1
    query_position = prefix_length
    cache = DynamicCache()
    _forward(model, ids[:-1], torch.arange(prefix_length, device=device), cache)
    tokens = [_NewToken(query_position, prefix_length, group=copy) for copy in range(3)]
    mask = _attention_mask(model, adapter, tokens, prefix_length)
    tap = _AblationCopies(full, adapter, adapter.num_layers(model))
    with tapped(model, adapter, tap):
        logits = _forward(model, ids[-1:].repeat(3), torch.full((3,), query_position, device=device), cache, mask, 3)
    _check_finite("the logits", logits)
    log_probs = torch.log_softmax(logits, dim=-1)
    stack = lambda tensors: torch.stack(tensors).float().cpu().numpy()  # noqa: E731
    return Ablation(
        delta=stack(tap.delta),
        a_tilde=stack(tap.a_tilde),
        bias_delta=stack(tap.bias_delta),
        update_frobenius_norm=np.array(tap.frobenius),
        kl=float(kl_divergence(full_log_probs, log_probs[2])),
        max_abs_logit_error=float((logits[1] - full.logits).abs().max()),
        patched_kl=max(float(kl_divergence(full_log_probs, log_probs[1])), 0.0),
    )


# ---- the measurement -------------------------------------------------------------------------------


@torch.no_grad()
def time_plain_forward(model: PreTrainedModel, input_ids: list[int], repeats: int) -> float | None:
    """The fastest of `repeats` plain forward passes over the prompt, as an application would run it."""
    if repeats < 1:
        return None
    ids = torch.tensor([input_ids], device=model.device)
    timings = []
    for _ in range(repeats):
        _synchronize(model.device)
        started = time.perf_counter()
        model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
        _synchronize(model.device)
        timings.append(time.perf_counter() - started)
    return min(timings)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(
    model: PreTrainedModel,
    prompt: SegmentedPrompt,
    *,
    stride: int = 1,
    chunk_copies: int = CHUNK_COPIES,
    attribute_segments: bool = True,
    model_name: str | None = None,
    adapter: ArchitectureAdapter | None = None,
    plain_forward_repeats: int = PLAIN_FORWARD_REPEATS,
    warm_up: bool = False,
) -> Measurement:
    """Measure the prompt's per-token dynamics and, per labelled segment, the exact patch for removing it.

    `timings["plain_forward_s"]` is the fastest of `plain_forward_repeats` plain forward passes over the
    prompt (no hooks), run after the measurement so that they are warm; 0 repeats: not timed (None).
    `warm_up` runs one plain pass and computes the model's dense factors (dense_factor.py) before the clock
    starts: the first pass of a process is several times slower than the next, and the factors are made
    once per model (a one-off measurement would otherwise time a cold model).
    """
    adapter = adapter or adapter_for(model)
    limit = max_positions(model)
    if limit is not None and len(prompt.input_ids) > limit:
        raise BadInputError(f"the prompt has {len(prompt.input_ids)} tokens; the model's context is {limit}")
    vocabulary = model.get_input_embeddings().num_embeddings
    if max(prompt.input_ids) >= vocabulary or min(prompt.input_ids) < 0:
        raise BadInputError(f"the prompt has token ids outside the model's vocabulary of {vocabulary}")
    if chunk_copies < 1:
        raise BadInputError(f"chunk_copies must be at least 1, got {chunk_copies}")
    prefixes = measured_prefixes(prompt, stride)
    device = model.device
    ids = torch.tensor(prompt.input_ids, device=device)

    if plain_forward_repeats < 0:
        raise BadInputError(f"plain_forward_repeats must not be negative, got {plain_forward_repeats}")
    if warm_up:
        time_plain_forward(model, prompt.input_ids, 1)
        dense_factors(model, adapter)  # computed once per model (seconds): not part of this prompt's cost
    started = time.perf_counter()
    with dual_form(model, adapter):  # hybrids: every pass's Mamba2 mixers in the dual form (torch only)
        full = _RecordQuery()
        cache = DynamicCache()
        with tapped(model, adapter, full):
            full.logits = _forward(model, ids, torch.arange(len(ids), device=device), cache)[-1]
        _check_finite("the logits", full.logits)
        recorded_forward_s = time.perf_counter() - started
        full_log_probs = torch.log_softmax(full.logits, dim=-1)

        _crop(cache, prompt.query_position)
        dynamics = _prefix_dynamics(model, adapter, prompt, cache, prefixes, chunk_copies)
        del cache
        dynamics_s = time.perf_counter() - started - recorded_forward_s

        context = _ablate(model, adapter, prompt, full, full_log_probs, (prompt.anchor_tokens, prompt.query_position))
        segments = []
        if attribute_segments:
            for segment in prompt.labelled_segments:
                ablation = _ablate(model, adapter, prompt, full, full_log_probs, (segment.start, segment.end))
                segments.append(SegmentAttribution(
                    segment.label, segment.kind, segment.start, segment.end, segment.memory_id, segment.key, ablation
                ))
    measure_s = time.perf_counter() - started
    plain_forward_s = time_plain_forward(model, prompt.input_ids, plain_forward_repeats)

    anchor = prompt.anchor_tokens
    tokens = []
    for position in range(anchor, prompt.query_position):
        segment = prompt.segment_of(position)
        tokens.append(TokenInfo(position - anchor, position, prompt.token_texts[position], segment.label,
                                segment.memory_id))
    return Measurement(
        input_ids=list(prompt.input_ids),
        anchor_tokens=anchor,
        query_position=prompt.query_position,
        tokens=tokens,
        dynamics=dynamics,
        measured_prefixes=prefixes,
        context_ablation=context,
        segments=segments,
        model={
            "name": model_name or getattr(model.config, "name_or_path", None) or type(model).__name__,
            "num_layers": adapter.num_layers(model),
            "dtype": str(model.dtype).removeprefix("torch."),
            "device": str(device),
            "family": adapter.family,
        },
        timings={"plain_forward_s": plain_forward_s, "recorded_forward_s": recorded_forward_s,
                 "dynamics_s": dynamics_s, "measure_s": measure_s},
        log_probs=full_log_probs.cpu().numpy(),
        anchor_text="".join(prompt.token_texts[:anchor]),
    )
