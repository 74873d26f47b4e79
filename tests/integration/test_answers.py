"""Answer-position patches, the down-projection fit and its LoRA adapter, against independent computations."""

import numpy as np
import pytest
import torch
from engine_reference import run_recording
from test_engine_families import VOCAB, tiny_model

from icldaemon.engine import answers
from icldaemon.engine.adapters import adapter_for
from icldaemon.exceptions import UnsupportedArchitectureError

FAMILIES = ["llama", "qwen2", "phi3", "gpt2", "gpt_neox", "falcon_h1", "granitemoehybrid"]


def prompts(seed: int = 3, answer_tokens: int = 5):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (30,), generator=generator).tolist()
    with_ids = ids[:20]
    without_ids = ids[:4] + ids[11:20]  # the "memory" ids[4:11] taken out, closed up
    return with_ids, without_ids, ids[20 : 20 + answer_tokens]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_one_token_answer_patch_is_the_exact_patch_at_the_query(family):
    model = tiny_model(family)
    with_ids, without_ids, answer = prompts(answer_tokens=1)
    patch = answers.answer_patch(model, with_ids, without_ids, answer)
    full, _ = run_recording(model, with_ids)
    own, _ = run_recording(model, without_ids)
    # from the second layer on: the first layer sees the query's own embedding (its own position)
    hybrid, _ = run_recording(model, without_ids, overwrite=[own["h"][0], *full["h"][1:]])
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    for layer_idx in range(len(blocks) - 1):
        a_tilde = hybrid["a"][layer_idx]
        np.testing.assert_allclose(patch.a_tilde[layer_idx, 0], a_tilde.numpy(), rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            mlp_output = blocks[layer_idx].get_submodule(adapter.mlp)(a_tilde[None, None])[0, 0]
        # what joins the residual after the MLP module: its output times the block's own factor (GraniteMoeHybrid)
        mlp_output = mlp_output * adapter.mlp_output_factor(blocks[layer_idx])
        # the value is what the down projection must add: the residual's change over the factors after it
        expected = (full["h"][layer_idx + 1] - (hybrid["m"][layer_idx] + mlp_output)) / adapter.down_projection_factor(
            blocks[layer_idx])
        np.testing.assert_allclose(patch.value[layer_idx, 0], expected.numpy(), rtol=1e-4, atol=1e-5)
    assert patch.max_abs_log_prob_error < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_rank_one_down_projection_patches_reproduce_every_answer_position(family):
    """An independent check: hooks of the test's own add dD_t = v_t k_t^T / |k_t|^2 at each position."""
    model = tiny_model(family)
    with_ids, without_ids, answer = prompts()
    patch = answers.answer_patch(model, with_ids, without_ids, answer)
    adapter = adapter_for(model)
    positions = list(range(len(without_ids) - 1, len(without_ids) - 1 + len(answer)))
    handles = []
    for layer_idx, block in enumerate(adapter.blocks(model)):
        key = torch.as_tensor(patch.key[layer_idx], dtype=torch.float64)
        value = torch.as_tensor(patch.value[layer_idx], dtype=torch.float64)

        def add(module, args, output, key=key, value=value):
            output = output.clone()
            for row, position in enumerate(positions):
                k = args[0][0, position].double()
                output[0, position] += (value[row] * (k @ key[row]) / (key[row] @ key[row])).float()
            return output

        handles.append(block.get_submodule(adapter.down_proj).register_forward_hook(add))
    try:
        with torch.no_grad():
            patched = model(torch.tensor([without_ids + answer[:-1]])).logits[0, positions]
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        full_positions = list(range(len(with_ids) - 1, len(with_ids) - 1 + len(answer)))
        full = model(torch.tensor([with_ids + answer[:-1]])).logits[0, full_positions]
        plain = model(torch.tensor([without_ids + answer[:-1]])).logits[0, positions]
    assert (patched - full).abs().max() < 1e-4
    assert (plain - full).abs().max() > 1e-2  # the memory mattered


def test_keys_are_recomputed_from_the_stored_mlp_inputs():
    model = tiny_model("llama")
    patch = answers.answer_patch(model, *prompts())
    keys = answers.keys_from_inputs(model, patch.a_tilde)
    for layer_idx, key in enumerate(keys):
        np.testing.assert_allclose(key, patch.key[layer_idx], rtol=1e-5, atol=1e-6)


def ridge_reference(keys, values, generic, rank, ridge, preservation):
    """The normal equations of the stacked least-squares problem, solved in the primal, then an SVD."""
    count = len(keys)
    weight = np.sqrt(preservation * count / len(generic))
    inputs = np.concatenate([keys, weight * generic])
    targets = np.concatenate([values, np.zeros((len(generic), values.shape[1]))])
    penalty = ridge * np.mean(np.sum(keys**2, axis=1))
    delta = np.linalg.solve(inputs.T @ inputs + penalty * np.eye(inputs.shape[1]), inputs.T @ targets).T
    u, s, vt = np.linalg.svd(delta)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


@pytest.mark.parametrize(("count", "generic_count"), [(6, 5), (40, 30)], ids=["dual", "primal"])
def test_the_fit_is_the_ridge_solution_with_preservation(count, generic_count):
    generator = np.random.default_rng(0)
    d_ff, d_model = 48, 16
    keys = [generator.normal(size=(count, d_ff)) for _ in range(2)]
    values = [generator.normal(size=(count, d_model)) for _ in range(2)]
    generic = [generator.normal(size=(generic_count, d_ff)) for _ in range(2)]
    patch = answers.fit_down_projection(keys, values, generic, rank=3, ridge=0.1, preservation=2.0)
    assert patch.lora_A.shape == (2, 3, d_ff) and patch.lora_B.shape == (2, d_model, 3)
    for layer_idx in range(2):
        expected = ridge_reference(keys[layer_idx], values[layer_idx], generic[layer_idx], 3, 0.1, 2.0)
        np.testing.assert_allclose(patch.lora_B[layer_idx] @ patch.lora_A[layer_idx], expected, rtol=1e-6, atol=1e-9)


def test_preservation_keeps_generic_inputs_nearly_unchanged():
    generator = np.random.default_rng(1)
    keys, values = [generator.normal(size=(8, 40))], [generator.normal(size=(8, 10))]
    generic = [generator.normal(size=(30, 40))]
    free = answers.fit_down_projection(keys, values, generic, rank=8, ridge=0.01, preservation=0.0)
    kept = answers.fit_down_projection(keys, values, generic, rank=8, ridge=0.01, preservation=10.0)

    def moved(patch):
        return np.linalg.norm(generic[0] @ (patch.lora_B[0] @ patch.lora_A[0]).T)

    assert moved(kept) < 0.2 * moved(free)


@pytest.mark.parametrize("family", ["llama", "gpt2", "falcon_h1"])
def test_the_exported_adapter_loads_in_peft_as_a_plain_down_projection_lora(family, tmp_path):
    from peft import PeftModel

    model = tiny_model(family)
    patches = [answers.answer_patch(model, *prompts(seed)) for seed in (3, 4, 5)]
    layers = range(adapter_for(model).num_layers(model))
    patch = answers.fit_down_projection(
        [np.concatenate([p.key[layer_idx] for p in patches]) for layer_idx in layers],
        [np.concatenate([p.value[layer_idx] for p in patches]) for layer_idx in layers], rank=4)
    answers.export_lora(model, patch, tmp_path / "adapter", base_model="tiny")
    ids = torch.tensor([prompts(7)[0]])
    with torch.no_grad():
        base = model(ids).logits
        with answers.applied(model, patch):
            hooked = model(ids).logits
    peft_model = PeftModel.from_pretrained(tiny_model(family), str(tmp_path / "adapter")).eval()
    config = peft_model.peft_config["default"]
    assert not config.lora_bias and set(config.target_modules) == set(answers.down_projection_names(model))
    loaded_again = peft_model.load_adapter(str(tmp_path / "adapter"), adapter_name="again")
    assert loaded_again.missing_keys == [] and loaded_again.unexpected_keys == []
    peft_model.delete_adapter("again")
    with torch.no_grad():
        loaded = peft_model(ids).logits
        merged = peft_model.merge_and_unload()(ids).logits
    assert (hooked - base).abs().max() > 1e-4
    torch.testing.assert_close(loaded, hooked, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged, hooked, rtol=1e-4, atol=1e-5)


def test_families_whose_mlp_output_is_normalised_are_refused_by_name():
    with pytest.raises(UnsupportedArchitectureError, match="post_feedforward_layernorm"):
        answers.answer_patch(tiny_model("gemma3"), *prompts())
