"""Mamba2 (SSD) mixers of hybrid models, every prefix at once in the dual form (docs/method.md §8).

Within `dual_form(model, adapter)` every Mamba2 mixer runs this module's torch implementation instead of
its own: kernels (`mamba_ssm`, `causal_conv1d`), where installed, round differently, and one measurement
never mixes the two. Each forward pass is one of two kinds.

- A *prefill* (no 4D mask): a sequence from its first token. The scan runs in pieces of `piece` tokens
  (the mixer's own chunk size) and records, under the pass's cache object, the in_proj outputs before
  the convolution (`xbc`, with the multipliers), the steps `dt`, the log-decay from the start of each
  token's piece, and the state at every piece boundary: no state per token.
- *Copies* (new tokens against a recorded prefill, with the attention's own 4D additive mask passed as
  the "linear_attention" mask). Row r's sequence is the recorded tokens [0, L_r), L_r the number of
  cached keys its mask row allows, followed by the new tokens its row allows, in order (a row must see
  exactly the rows its visible rows see before them, with the same L). With `b` the last piece boundary
  at or before L_r and S_b the state there, the row's SSM output is

      y_r = C_r . (exp(Lambda_r) S_b + sum_s exp(Lambda_r - Lambda_s) dt_s x_s B_s^T) + D x_r

  the sum over the recorded tokens [b, L_r) and the row's own new tokens (itself included), Lambda the
  cumulative sum of dt * A from b: decayed linear attention over at most one piece of the context plus
  one read of a recorded state. Its convolution window is the last tokens of the same sequence.

Exponents are formed in float64 from the float32 steps, then exponentiated: the differences of long
cumulative sums would otherwise lose digits.
"""

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from icldaemon.engine.adapters import ArchitectureAdapter
from icldaemon.exceptions import BadInputError

ROW_BLOCK = 256  # rows whose attention over the context is computed at once: bounds [heads, rows, piece] tensors
LOG_DECAY_DTYPE = torch.float64


@dataclass
class _Record:
    """What a prefill leaves for the copies, per mixer."""

    piece: int
    xbc: torch.Tensor  # [tokens, conv_dim] in_proj outputs (multipliers applied) before the convolution, model dtype
    dt: torch.Tensor  # [tokens, heads] float32 discretisation steps
    log_decay: torch.Tensor  # [tokens, heads] float64: sum of dt * A from the start of the token's piece to it
    states: list[torch.Tensor]  # states[j]: after tokens [0, (j + 1) * piece), [heads, head_dim, state] float32

    @property
    def tokens(self) -> int:
        return self.xbc.shape[0]


class _Mamba2:
    """A Mamba2 mixer's shapes and factors, read once (Falcon-H1, Bamba and GraniteMoeHybrid share them)."""

    def __init__(self, mixer: nn.Module):
        self.module = mixer
        self.layer_idx = mixer.layer_idx
        self.heads, self.head_dim = mixer.num_heads, mixer.head_dim
        self.groups, self.state_size = mixer.n_groups, mixer.ssm_state_size
        self.inner, self.conv_dim, self.kernel = mixer.intermediate_size, mixer.conv_dim, mixer.conv_kernel_size
        self.piece = mixer.chunk_size
        self.dt_limit = tuple(mixer.time_step_limit)
        self.input_scale = getattr(mixer, "ssm_in_multiplier", None)  # Falcon-H1's muP factors
        self.projection_scale = getattr(mixer, "mup_vector", None)
        # Falcon-H1 may gate with silu(z) instead of the gated norm; Bamba and GraniteMoeHybrid always norm
        self.gated_norm = getattr(mixer, "mamba_rms_norm", True)

    # ---- the parts every pass shares ----

    def project(self, hidden_states: torch.Tensor):
        """(gate, xbc, dt before its bias): [rows, inner], [rows, conv_dim], [rows, heads]."""
        if self.input_scale is not None:
            hidden_states = hidden_states * self.input_scale
        projected = self.module.in_proj(hidden_states)
        if self.projection_scale is not None:
            projected = projected * self.projection_scale
        return projected[0].split([self.inner, self.conv_dim, self.heads], dim=-1)

    def convolve(self, windows: torch.Tensor, outputs: int) -> torch.Tensor:
        """The last `outputs` positions of the causal convolution over `windows` [batch, length, conv_dim] (zeros
        before it), activated: [batch, outputs, conv_dim]."""
        conv = self.module.conv1d
        weight = conv.weight  # [conv_dim, 1, kernel]
        length = windows.shape[1]
        result = F.conv1d(windows.transpose(1, 2).to(weight.dtype), weight, conv.bias, padding=self.kernel - 1,
                          groups=self.conv_dim)[:, :, :length]
        return self.module.act(result[:, :, length - outputs:]).transpose(1, 2).to(windows.dtype)

    def split(self, convolved: torch.Tensor):
        """x [rows, heads, head_dim], B and C [rows, groups, state], float32."""
        x, B, C = convolved.split([self.inner, self.groups * self.state_size, self.groups * self.state_size], dim=-1)
        rows = convolved.shape[0]
        return (x.float().reshape(rows, self.heads, self.head_dim),
                B.float().reshape(rows, self.groups, self.state_size),
                C.float().reshape(rows, self.groups, self.state_size))

    def steps(self, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dt, dt * A), float32 [rows, heads]."""
        dt = F.softplus(dt.float() + self.module.dt_bias.float()).clamp(*self.dt_limit)
        return dt, dt * -torch.exp(self.module.A_log.float())

    def output(self, y: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, dtype) -> torch.Tensor:
        """The mixer's output from the SSM read-out y [rows, heads, head_dim]: skip, gate, out_proj."""
        y = y + self.module.D.float()[:, None] * x
        y = y.reshape(1, -1, self.inner)
        if self.gated_norm:
            y = self.module.norm(y, gate[None])
        else:
            y = y * F.silu(gate[None])
        return self.module.out_proj(y.to(dtype))

    def heads_of(self, per_group: torch.Tensor, dim: int) -> torch.Tensor:
        return per_group.repeat_interleave(self.heads // self.groups, dim=dim)


def _attend(mamba: _Mamba2, C_rows, log_decay_rows, B_cols, x_cols, dt_cols, log_decay_cols, allowed) -> torch.Tensor:
    """sum_s (C_r . B_s) exp(Lambda_r - Lambda_s) dt_s x_s over the allowed (r, s): [rows, heads, head_dim]."""
    groups, rows, cols = mamba.groups, C_rows.shape[0], B_cols.shape[0]
    scores = torch.matmul(C_rows.transpose(0, 1), B_cols.permute(1, 2, 0))  # [groups, rows, cols]
    # allowed pairs decay (exponent <= 0); the others are clamped before they are zeroed, so nothing overflows
    exponent = (log_decay_rows.T[:, :, None] - log_decay_cols.T[:, None, :]).float().clamp_max_(0.0)
    weights = torch.exp_(exponent).mul_(allowed).mul_(dt_cols.T[:, None, :])  # [heads, rows, cols]
    weights = weights.view(groups, -1, rows, cols).mul_(scores[:, None]).view(-1, rows, cols)
    return torch.bmm(weights, x_cols.transpose(0, 1)).transpose(0, 1)  # [rows, heads, head_dim]


def _read_state(mamba: _Mamba2, state, C_rows, log_decay_rows) -> torch.Tensor:
    """C_r . exp(Lambda_r) S: [rows, heads, head_dim]."""
    grouped = state.view(mamba.groups, -1, mamba.state_size)  # [groups, heads per group * head_dim, state]
    read = torch.matmul(grouped, C_rows.permute(1, 2, 0))  # [groups, heads per group * head_dim, rows]
    read = read.permute(2, 0, 1).reshape(C_rows.shape[0], mamba.heads, mamba.head_dim)
    return read * torch.exp(log_decay_rows).float()[:, :, None]


def _advance(mamba: _Mamba2, state, log_decay, x, B, dt) -> torch.Tensor:
    """The state after a piece, from the state before it: [heads, head_dim, state]."""
    last = log_decay[-1]
    weights = torch.exp(last[None] - log_decay).float() * dt  # [tokens, heads]
    weighted = (weights[:, :, None] * x).view(x.shape[0], mamba.groups, -1)  # [tokens, groups, per group]
    added = torch.matmul(weighted.permute(1, 2, 0), B.transpose(0, 1))  # [groups, per group, state]
    return torch.exp(last).float()[:, None, None] * state + added.view(mamba.heads, mamba.head_dim, mamba.state_size)


# ---- a prefill ---------------------------------------------------------------------------------------


def _prefill(mamba: _Mamba2, hidden_states: torch.Tensor, record: bool) -> tuple[torch.Tensor, _Record | None]:
    dtype = hidden_states.dtype
    gate, xbc, dt_raw = mamba.project(hidden_states)
    tokens = xbc.shape[0]
    x, B, C = mamba.split(mamba.convolve(xbc[None], tokens)[0])
    dt, dA = mamba.steps(dt_raw)
    piece = mamba.piece
    log_decay = torch.empty(tokens, mamba.heads, dtype=LOG_DECAY_DTYPE, device=xbc.device)
    y = torch.empty(tokens, mamba.heads, mamba.head_dim, dtype=torch.float32, device=xbc.device)
    state = None
    states = []
    for start in range(0, tokens, piece):
        rows = slice(start, min(start + piece, tokens))
        decay = torch.cumsum(dA[rows].to(LOG_DECAY_DTYPE), dim=0)
        log_decay[rows] = decay
        length = decay.shape[0]
        causal = torch.ones(length, length, dtype=torch.float32, device=xbc.device).tril_()
        y[rows] = _attend(mamba, C[rows], decay, B[rows], x[rows], dt[rows], decay, causal)
        if state is not None:
            y[rows] += _read_state(mamba, state, C[rows], decay)
        if length == piece and (record or rows.stop < tokens):
            previous = state if state is not None else torch.zeros(
                mamba.heads, mamba.head_dim, mamba.state_size, dtype=torch.float32, device=xbc.device)
            state = _advance(mamba, previous, decay, x[rows], B[rows], dt[rows])
            states.append(state)
    output = mamba.output(y, x, gate, dtype)
    if not record:
        return output, None
    return output, _Record(piece=piece, xbc=xbc.detach().clone(), dt=dt, log_decay=log_decay, states=states)


# ---- copies ------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """Where each new row's sequence comes from, read off the 4D mask once per pass."""

    limits: torch.Tensor  # [rows] recorded tokens each row follows
    recorded_rows: torch.Tensor  # the recorded tokens some convolution window holds, ascending
    windows: torch.Tensor  # [rows, kernel] indices into [those recorded rows | a zero row | the new rows]
    visible: torch.Tensor  # [rows, rows] float64: the new rows each row's sequence holds, itself included
    earlier: tuple[torch.Tensor, torch.Tensor]  # (row, earlier new row it sees) pairs
    groups: list[tuple[torch.Tensor, int, int, int]]  # (rows, boundary index b, first, end of the recorded columns)


def _plan(mask: torch.Tensor, rows: int, recorded: int, piece: int, kernel: int) -> _Plan:
    allowed = mask[0, 0] == 0  # [rows, cached + rows]
    cached = allowed.shape[1] - rows
    device = mask.device
    recorded_keys = allowed[:, :cached]
    limits = recorded_keys.sum(dim=1)
    if not torch.equal(recorded_keys, torch.arange(cached, device=device)[None] < limits[:, None]):
        raise ValueError("a copy's mask must allow a prefix of the recorded tokens")
    if cached > recorded:
        raise ValueError(f"the copies see {cached} cached tokens; the prefill recorded {recorded}")
    visible = allowed[:, cached:]
    order = torch.arange(rows, device=device)
    if not visible.diagonal().all() or (visible & (order[None, :] > order[:, None])).any():
        raise ValueError("a copy must see itself and only earlier new tokens")
    earlier = visible & (order[None, :] != order[:, None])
    row_idx, seen_idx = earlier.nonzero(as_tuple=True)
    counts = earlier.sum(dim=1)
    seen_before = (earlier.cumsum(dim=1) - earlier.long())[row_idx, seen_idx]
    if (limits[row_idx] != limits[seen_idx]).any() or (seen_before != counts[seen_idx]).any():
        raise ValueError("the new tokens a copy sees must form one sequence with the same recorded tokens")
    # the q-th token before each row: its q-th most recent visible new row, else a recorded token, else zero
    from_end = earlier.flip(1).cumsum(dim=1).flip(1)
    windows = torch.empty(rows, kernel, dtype=torch.long, device=device)
    windows[:, -1] = recorded + 1 + order
    for back in range(1, kernel):
        hit = earlier & (from_end == back)
        column = hit.int().argmax(dim=1)
        position = limits - (back - counts)
        windows[:, -1 - back] = torch.where(hit.any(dim=1), recorded + 1 + column,
                                            torch.where(position >= 0, position, torch.full_like(position, recorded)))
    # compact: only the recorded rows some window holds
    is_recorded = windows < recorded
    recorded_rows = torch.unique(windows[is_recorded])
    compact = torch.searchsorted(recorded_rows, windows.clamp(max=recorded - 1))
    windows = torch.where(is_recorded, compact, windows - recorded + len(recorded_rows))
    boundary = limits // piece
    groups = []
    for b in torch.unique(boundary).tolist():
        members = (boundary == b).nonzero(as_tuple=True)[0]
        for first in range(0, len(members), ROW_BLOCK):
            block = members[first : first + ROW_BLOCK]
            groups.append((block, b, b * piece, int(limits[block].max())))
    return _Plan(limits=limits, recorded_rows=recorded_rows, windows=windows, visible=visible.to(LOG_DECAY_DTYPE),
                 earlier=(row_idx, seen_idx), groups=groups)


def _copies(mamba: _Mamba2, hidden_states: torch.Tensor, record: _Record, plan: _Plan) -> torch.Tensor:
    dtype = hidden_states.dtype
    gate, xbc, dt_raw = mamba.project(hidden_states)
    x, B, C = mamba.split(_convolve_windows(mamba, record.xbc, xbc, plan))
    dt, dA = mamba.steps(dt_raw)
    own_decay = plan.visible @ dA.to(LOG_DECAY_DTYPE)  # [rows, heads]: through the row's own new tokens
    # and through its recorded tokens after the boundary
    partial_piece = plan.limits % record.piece != 0
    last_recorded = (plan.limits - 1).clamp_min(0)
    context_decay = torch.where(partial_piece[:, None], record.log_decay[last_recorded], 0.0)
    log_decay = context_decay + own_decay

    # each row's own token: weight (C_r . B_r) dt_r
    y = (mamba.heads_of((C * B).sum(dim=-1), 1) * dt)[:, :, None] * x  # [rows, heads, head_dim]
    row, seen = plan.earlier
    if len(row):
        scores = mamba.heads_of((C[row] * B[seen]).sum(dim=-1), 1)  # [pairs, heads]
        weights = scores * torch.exp(own_decay[row] - own_decay[seen]).float() * dt[seen]
        y.index_add_(0, row, weights[:, :, None] * x[seen])
    for members, boundary, first, end in plan.groups:
        if end > first:
            start = max(first - (mamba.kernel - 1), 0)
            x_cols, B_cols, _ = mamba.split(mamba.convolve(record.xbc[None, start:end], end - first)[0])
            positions = torch.arange(first, end, device=xbc.device)
            allowed = (positions[None, :] < plan.limits[members][:, None]).float()
            y[members] += _attend(mamba, C[members], log_decay[members], B_cols, x_cols, record.dt[first:end],
                                  record.log_decay[first:end], allowed)
        if boundary > 0:
            y[members] += _read_state(mamba, record.states[boundary - 1], C[members], log_decay[members])
    return mamba.output(y, x, gate, dtype)


def _convolve_windows(mamba: _Mamba2, recorded: torch.Tensor, new: torch.Tensor, plan: "_Plan") -> torch.Tensor:
    """Each row's convolution over its window (plan.windows indexes [the recorded rows it names | a zero row |
    the new rows]), activated: [rows, conv_dim]."""
    source = torch.cat([recorded[plan.recorded_rows], new.new_zeros(1, new.shape[1]), new])
    conv = mamba.module.conv1d
    weight = conv.weight[:, 0].T  # [kernel, conv_dim]
    result = (source[plan.windows].to(weight.dtype) * weight).sum(dim=1)
    if conv.bias is not None:
        result = result + conv.bias
    return mamba.module.act(result).to(new.dtype)


# ---- the scope ---------------------------------------------------------------------------------------


class _Scope:
    def __init__(self):
        self.records: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> {layer_idx: _Record}
        self.plan_mask: torch.Tensor | None = None  # every layer of one pass gets the same mask: one plan per pass
        self.plan_key: tuple | None = None
        self.plan: _Plan | None = None

    def plan_for(self, mask: torch.Tensor, rows: int, record: _Record, kernel: int) -> _Plan:
        key = (rows, record.tokens, record.piece, kernel)
        if self.plan_mask is not mask or self.plan_key != key:
            self.plan = _plan(mask, rows, record.tokens, record.piece, kernel)
            self.plan_mask, self.plan_key = mask, key
        return self.plan


def _mixer_forward(mamba: _Mamba2, scope: _Scope, hidden_states, cache_params=None, attention_mask=None, **kwargs):
    if hidden_states.shape[0] != 1:
        raise BadInputError("hybrid models are measured one prompt at a time (batch 1)")
    if attention_mask is not None and attention_mask.dim() == 4:
        records = scope.records.get(cache_params) if cache_params is not None else None
        record = None if records is None else records.get(mamba.layer_idx)
        if record is None:
            raise ValueError("copies of the query need the recorded prefill of their cache")
        plan = scope.plan_for(attention_mask, hidden_states.shape[1], record, mamba.kernel)
        return _copies(mamba, hidden_states, record, plan)
    if attention_mask is not None:
        raise BadInputError("padded batches are not measured: a prefill runs one unpadded prompt")
    output, record = _prefill(mamba, hidden_states, record=cache_params is not None)
    if record is not None:
        scope.records.setdefault(cache_params, {})[mamba.layer_idx] = record
    return output


@contextmanager
def dual_form(model: nn.Module, adapter: ArchitectureAdapter):
    """Within the block every Mamba2 mixer of the model runs in the dual form (nothing for other families).

    A prefill with a cache records what later copies against that cache need; copies read it.
    """
    mixers = adapter.mixers(model)
    scope = _Scope()
    replaced = []
    try:
        for mixer in mixers:
            replaced.append((mixer, mixer.__dict__.get("forward")))
            mixer.forward = partial(_mixer_forward, _Mamba2(mixer), scope)
        yield
    finally:
        for mixer, previous in replaced:
            if previous is None:
                del mixer.forward
            else:
                mixer.forward = previous


def is_hybrid(adapter: ArchitectureAdapter) -> bool:
    return adapter.mixer is not None
