"""A slow, obvious reference for the engine: two separate forward passes per prefix, dW materialised.

Its hooks are its own (nothing from icldaemon.engine.hooks or .measure); it reads only the adapter's
declarative module paths.
"""

import numpy as np
import torch

from icldaemon.engine.adapters import adapter_for

NAMES = ("delta_norm", "update_frobenius_norm", "marginal_update_norm", "cumulative_update_norm",
         "implicit_learning_rate", "bias_update_norm")


def run_recording(model, ids: list[int], overwrite: list[torch.Tensor] | None = None):
    """Run the prompt `ids` as it stands (positions 0, 1, 2, ...); at the last position record every
    layer's input h, MLP input a, residual m, dense output z; with `overwrite`, replace the last
    position's input of layer l first."""
    adapter = adapter_for(model)
    record = {"h": [], "a": [], "m": [], "z": []}
    handles = []
    for layer_idx, block in enumerate(adapter.blocks(model)):
        seen: dict = {}

        def before_block(module, args, kwargs, layer_idx=layer_idx):
            hidden = args[0] if args else kwargs["hidden_states"]
            if overwrite is not None:
                hidden = hidden.clone()
                hidden[0, -1] = overwrite[layer_idx]
            record["h"].append(hidden[0, -1].clone())
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        def before_mlp(module, args, seen=seen):
            seen["a"] = args[0][0, -1].clone()

        def after_dense(module, args, output, seen=seen):
            seen.setdefault("z", []).append(output[0, -1].clone())

        def after_mlp_output(module, args, output, seen=seen, factor=adapter.mlp_output_factor(block)):
            seen["mlp_output"] = factor * (output[0] if isinstance(output, tuple) else output)[0, -1].clone()

        def after_block(module, args, output, seen=seen):
            output = output[0] if isinstance(output, tuple) else output
            record["a"].append(seen["a"])
            record["z"].append(torch.cat(seen.pop("z")))
            record["m"].append(output[0, -1] - seen["mlp_output"])

        handles.append(block.register_forward_pre_hook(before_block, with_kwargs=True))
        handles.append(block.get_submodule(adapter.mlp).register_forward_pre_hook(before_mlp))
        for path in adapter.first_dense:
            handles.append(block.get_submodule(path).register_forward_hook(after_dense))
        handles.append(block.get_submodule(adapter.mlp_output).register_forward_hook(after_mlp_output))
        handles.append(block.register_forward_hook(after_block))
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].double()
    finally:
        for handle in handles:
            handle.remove()
    return record, logits


def dense_weights(model) -> list[torch.Tensor]:
    """Per layer W = [W_gate; W_up] as a [d_ff_total, d_model] matrix."""
    adapter = adapter_for(model)
    weights = []
    for block in adapter.blocks(model):
        parts = []
        for path in adapter.first_dense:
            module = block.get_submodule(path)
            weight = module.weight.detach()
            parts.append(weight if isinstance(module, torch.nn.Linear) else weight.T)  # Conv1D is transposed
        weights.append(torch.cat(parts).double())
    return weights


def exact_patch(model, full_ids: list[int], ablated_ids: list[int]):
    """Per layer (dW, db, delta, a~) for going from the prompt `ablated_ids` to `full_ids`, at the last token."""
    full, _ = run_recording(model, full_ids)
    hybrid, _ = run_recording(model, ablated_ids, overwrite=full["h"])
    patches = []
    for layer_idx, weight in enumerate(dense_weights(model)):
        a, a_tilde = full["a"][layer_idx].double(), hybrid["a"][layer_idx].double()
        delta = a - a_tilde
        update = torch.outer(weight @ delta, a_tilde) / (a_tilde @ a_tilde)
        bias = full["m"][layer_idx].double() - hybrid["m"][layer_idx].double()
        patches.append((update, bias, delta, a_tilde))
    return patches


def without(ids: list[int], start: int, end: int) -> list[int]:
    """The prompt with tokens [start, end) taken out and the rest closed up."""
    return ids[:start] + ids[end:]


def reference_dynamics(model, prompt, prefixes: list[int] | None = None) -> dict[str, np.ndarray]:
    ids, anchor, query = prompt.input_ids, prompt.anchor_tokens, prompt.query_position
    n = query - anchor
    prefixes = prefixes or list(range(1, n + 1))
    num_layers = len(adapter_for(model).blocks(model))
    values = {name: np.full((num_layers, n), np.nan) for name in NAMES}
    previous = None
    path_length = np.zeros(num_layers)
    for prefix in prefixes:
        # prefix i: anchor + c_1..c_i + query; no context: anchor + query
        patches = exact_patch(model, ids[: anchor + prefix] + ids[query:], ids[:anchor] + ids[query:])
        for layer_idx, (update, bias, delta, a_tilde) in enumerate(patches):
            before = torch.zeros_like(update) if previous is None else previous[layer_idx][0]
            marginal = float(torch.linalg.matrix_norm(update - before))
            path_length[layer_idx] += marginal
            column = prefix - 1
            values["delta_norm"][layer_idx, column] = float(delta.norm())
            values["update_frobenius_norm"][layer_idx, column] = float(torch.linalg.matrix_norm(update))
            values["marginal_update_norm"][layer_idx, column] = marginal
            values["cumulative_update_norm"][layer_idx, column] = path_length[layer_idx]
            values["implicit_learning_rate"][layer_idx, column] = float(1 / (a_tilde @ a_tilde))
            values["bias_update_norm"][layer_idx, column] = float(bias.norm())
        previous = patches
    return values


def behavioural_kl(model, ids: list[int], ablated_ids: list[int]) -> float:
    _, full_logits = run_recording(model, ids)
    _, ablated_logits = run_recording(model, ablated_ids)
    log_p, log_q = torch.log_softmax(full_logits, -1), torch.log_softmax(ablated_logits, -1)
    return float((log_p.exp() * (log_p - log_q)).sum())
