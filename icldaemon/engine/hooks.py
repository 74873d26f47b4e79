"""Scoped hooks on every block of a model: installed on entry, removed on exit (also on an exception)."""

from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from icldaemon.engine.adapters import ArchitectureAdapter


class Tap:
    """Callbacks run at every block; each may return a replacement tensor or None to keep it.

    `state` is the block's captures of the current forward pass: "a" (the MLP input), "z" (the first
    dense layers' outputs, in the adapter's order) and "mlp_output" (what the MLP adds to the residual,
    after the adapter's `mlp_output_scale`).
    All tensors are [batch, seq, features].
    """

    def layer_input(self, layer_idx: int, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return None

    def dense_output(
        self, layer_idx: int, dense_idx: int, module: nn.Module, output: torch.Tensor, state: dict
    ) -> torch.Tensor | None:
        return None

    def layer_output(self, layer_idx: int, hidden_states: torch.Tensor, state: dict) -> torch.Tensor | None:
        return None

    def duplicate_rows(self) -> tuple[slice, torch.Tensor, torch.Tensor] | None:
        """(computed, targets, sources): rows whose attention projections equal those of other rows.

        Only the rows in `computed` are projected; each row of `targets` takes the projection of the
        row at the same place in `sources`. None: every row is projected.
        """
        return None

    def mlp_rows(self) -> torch.Tensor | slice | None:
        """Rows whose MLP output is read; the others skip the MLP (their output is zeros, their `a` is
        still recorded). None: all rows."""
        return None

    def down_output(self, layer_idx: int, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        """The down projection's input (the MLP's intermediate activation) and output, [batch, seq, features]."""
        return None


def _replace_first(value, replacement):
    if isinstance(value, tuple):
        return (replacement, *value[1:])
    return replacement


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _block_pre(tap: Tap, layer_idx: int, state: dict, module, args, kwargs):
    state.clear()
    state["z"] = []
    if args:
        replaced = tap.layer_input(layer_idx, args[0])
        return None if replaced is None else ((replaced, *args[1:]), kwargs)
    replaced = tap.layer_input(layer_idx, kwargs["hidden_states"])
    return None if replaced is None else (args, {**kwargs, "hidden_states": replaced})


def _mlp_pre(tap: Tap, state: dict, module, args, kwargs):
    state["a"] = args[0] if args else next(iter(kwargs.values()))
    rows = tap.mlp_rows()
    if rows is None:
        return None
    state["mlp_skipped"] = (rows, state["a"].shape[:-1])
    if args:
        return (args[0][:, rows], *args[1:]), kwargs
    name = next(iter(kwargs))
    return args, {**kwargs, name: kwargs[name][:, rows]}


def _mlp_post(state: dict, module, args, kwargs, output):
    if "mlp_skipped" not in state:
        return None
    rows, (batch, sequence) = state.pop("mlp_skipped")
    computed = _first(output)
    expanded = computed.new_zeros(batch, sequence, computed.shape[-1])
    expanded[:, rows] = computed
    return _replace_first(output, expanded)


def _dense(tap: Tap, layer_idx: int, dense_idx: int, state: dict, module, args, output):
    replaced = tap.dense_output(layer_idx, dense_idx, module, output, state)
    state["z"].append(output if replaced is None else replaced)
    return replaced


def _mlp_output(state: dict, factor: float, module, args, output):
    state["mlp_output"] = _first(output) if factor == 1.0 else _first(output) * factor


def _block_post(tap: Tap, layer_idx: int, state: dict, module, args, kwargs, output):
    replaced = tap.layer_output(layer_idx, _first(output), state)
    state.clear()
    return None if replaced is None else _replace_first(output, replaced)


def _down_post(tap: Tap, layer_idx: int, module, args, output):
    return tap.down_output(layer_idx, args[0], output)


def _projection_pre(tap: Tap, module, args):
    plan = tap.duplicate_rows()
    return None if plan is None else (args[0][:, plan[0]], *args[1:])


def _projection_post(tap: Tap, module, args, output):
    plan = tap.duplicate_rows()
    if plan is None:
        return None
    computed, targets, sources = plan
    batch, rows, features = output.shape
    expanded = output.new_empty(batch, rows + len(targets), features)
    expanded[:, computed] = output
    expanded[:, targets] = expanded[:, sources]
    return expanded


@contextmanager
def tapped(model: nn.Module, adapter: ArchitectureAdapter, tap: Tap):
    handles = []
    try:
        for layer_idx, block in enumerate(adapter.blocks(model)):
            state: dict = {}
            handles.append(block.register_forward_pre_hook(partial(_block_pre, tap, layer_idx, state), with_kwargs=True))
            mlp = block.get_submodule(adapter.mlp)
            handles.append(mlp.register_forward_pre_hook(partial(_mlp_pre, tap, state), with_kwargs=True))
            # before the mlp_output hook, which may sit on the same module: it must see the expanded output
            handles.append(mlp.register_forward_hook(partial(_mlp_post, state), with_kwargs=True))
            for dense_idx, path in enumerate(adapter.first_dense):
                handles.append(
                    block.get_submodule(path).register_forward_hook(partial(_dense, tap, layer_idx, dense_idx, state))
                )
            handles.append(block.get_submodule(adapter.mlp_output).register_forward_hook(
                partial(_mlp_output, state, adapter.mlp_output_factor(block))))
            for projection in adapter.present(block, adapter.attention_projections):
                handles.append(projection.register_forward_pre_hook(partial(_projection_pre, tap)))
                handles.append(projection.register_forward_hook(partial(_projection_post, tap)))
            down = block.get_submodule(adapter.down_proj)
            handles.append(down.register_forward_hook(partial(_down_post, tap, layer_idx)))
            handles.append(block.register_forward_hook(partial(_block_post, tap, layer_idx, state), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
