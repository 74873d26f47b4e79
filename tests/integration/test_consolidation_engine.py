"""Static patches: the ridge fit against a dense solution, the exact single-query case, the PEFT adapter."""

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from test_engine_families import tiny_model

from icldaemon.engine.consolidation import (
    PatchSet,
    apply_static_patch,
    export_lora,
    FidelityExample,
    fit_sequential_static_patch,
    fit_static_patch,
    measure_fidelity,
    without_segments,
)
from icldaemon.engine.measure import measure
from icldaemon.engine.prompt import Segment, SegmentedPrompt
from icldaemon.exceptions import NumericalError, UnsupportedArchitectureError

VOCAB = 97
EXPORTABLE = ("gpt2", "gpt_neox", "llama", "phi3", "qwen2")


def memory_prompt(seed: int, length: int = 20) -> SegmentedPrompt:
    """Random tokens; tokens 6..11 are memory 1 and the same in every prompt, the rest vary with seed."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (length,), generator=generator).tolist()
    ids[6:11] = [11, 12, 13, 14, 15]
    return SegmentedPrompt(ids, [
        Segment("anchor", "anchor", 0, 2),
        Segment("context", "context", 2, 6),
        Segment("memory:1", "memory", 6, 11, memory_id=1, key="fact"),
        Segment("context", "context", 11, length - 1),
        Segment("query", "query", length - 1, length),
    ])


def memory_patches(model, seeds) -> PatchSet:
    ablations = [measure(model, memory_prompt(seed), stride=100).segments[0].ablation for seed in seeds]
    return PatchSet(
        delta=np.stack([ablation.delta for ablation in ablations]),
        a_tilde=np.stack([ablation.a_tilde for ablation in ablations]),
        bias_delta=np.stack([ablation.bias_delta for ablation in ablations]),
    )


def dense_ridge(deltas: np.ndarray, inputs: np.ndarray, ridge: float) -> np.ndarray:
    """R = D (A^T A + lambda I)^-1 A^T formed densely; deltas and inputs are [K, d]."""
    D, A = deltas.T, inputs.T
    gram = A.T @ A
    lam = ridge * np.trace(gram) / len(deltas)
    return D @ np.linalg.inv(gram + lam * np.eye(len(deltas))) @ A.T


# ---- the fit


def test_fit_equals_the_dense_ridge_solution_and_its_truncation():
    rng = np.random.default_rng(0)
    count, d_model = 6, 16
    patches = PatchSet(rng.normal(size=(count, 2, d_model)), rng.normal(size=(count, 2, d_model)),
                       rng.normal(size=(count, 2, d_model)))
    full = fit_static_patch(patches, rank=count, ridge=0.05)
    truncated = fit_static_patch(patches, rank=2, ridge=0.05)
    for layer_idx in range(2):
        expected = dense_ridge(patches.delta[:, layer_idx], patches.a_tilde[:, layer_idx], 0.05)
        np.testing.assert_allclose(full.left[layer_idx] @ full.right[layer_idx].T, expected, atol=1e-10)
        singular = np.linalg.svd(expected, compute_uv=False)
        error = np.linalg.norm(truncated.left[layer_idx] @ truncated.right[layer_idx].T - expected)
        assert error == pytest.approx(np.sqrt(np.sum(singular[2:] ** 2)), rel=1e-8)  # Eckart-Young
        np.testing.assert_allclose(full.bias[layer_idx], patches.bias_delta[:, layer_idx].mean(axis=0))
    assert truncated.rank == 2 and full.rank == count


def test_ridge_shrinks_a_single_patch_by_one_plus_ridge():
    rng = np.random.default_rng(1)
    patches = PatchSet(rng.normal(size=(1, 1, 8)), rng.normal(size=(1, 1, 8)), rng.normal(size=(1, 1, 8)))
    static = fit_static_patch(patches, rank=4, ridge=0.25)
    assert static.rank == 1
    np.testing.assert_allclose(static.input_delta(0, patches.a_tilde[0, 0]), patches.delta[0, 0] / 1.25)


def test_nan_in_the_factors_and_dependent_inputs_are_refused():
    rng = np.random.default_rng(2)
    values = rng.normal(size=(3, 2, 8))
    broken = values.copy()
    broken[1, 1, 3] = np.nan
    with pytest.raises(NumericalError, match="patch 1 has NaN or inf in its a_tilde at layer 1"):
        fit_static_patch(PatchSet(values, broken, values), rank=2)
    repeated = np.repeat(values[:1], 3, axis=0)
    with pytest.raises(NumericalError, match="linearly dependent"):
        fit_static_patch(PatchSet(values, repeated, values), rank=2, ridge=0.0)
    fit_static_patch(PatchSet(values, repeated, values), rank=2, ridge=0.01)  # the ridge makes it solvable


# ---- on models


@pytest.mark.parametrize("family", ["gemma2", "gpt2", "gpt_neox", "llama", "phi3", "qwen3"])
def test_a_single_query_static_patch_reproduces_that_querys_exact_patch(family):
    model = tiny_model(family)
    prompt = memory_prompt(seed=3)
    patches = memory_patches(model, [3])
    static = fit_static_patch(patches, rank=4, ridge=0.0)
    for layer_idx in range(static.num_layers):
        a_tilde = patches.a_tilde[0, layer_idx].astype(np.float64)
        np.testing.assert_allclose(static.input_delta(layer_idx, a_tilde), patches.delta[0, layer_idx],
                                   rtol=1e-5, atol=1e-6)
    # C without the memory, the memory's positions left empty as in the measurement: the static patch at
    # the query position gives back the full context's prediction
    memory = prompt.segments[2]
    kept = [index for index in range(len(prompt.input_ids)) if not memory.start <= index < memory.end]
    with torch.no_grad():
        full_logits = model(input_ids=torch.tensor([prompt.input_ids])).logits[0, -1]
        without = dict(input_ids=torch.tensor([[prompt.input_ids[i] for i in kept]]), position_ids=torch.tensor([kept]))
        plain_logits = model(**without).logits[0, -1]
        with apply_static_patch(model, static, everywhere=False):
            patched_logits = model(**without).logits[0, -1]
    assert (plain_logits - full_logits).abs().max() > 1e-3  # the memory matters
    assert (patched_logits - full_logits).abs().max() < 1e-5
    fidelity = measure_fidelity(model, static, [FidelityExample(prompt.input_ids, without["input_ids"][0].tolist(),
                                                                kept)])
    assert fidelity.kl_without > 1e-6
    assert fidelity.kl_adapter_query < 1e-9
    assert fidelity.recovered_query == pytest.approx(1.0, abs=1e-6)
    assert fidelity.greedy_match_query == 1.0


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
def test_a_sequential_fit_on_one_query_reproduces_it_at_every_position(family):
    model = tiny_model(family)
    prompt = memory_prompt(seed=7)
    example = FidelityExample(prompt.input_ids, without_segments(prompt, {"memory:1"}))
    static = fit_sequential_static_patch(model, [example], rank=2, ridge=0.0)
    with torch.no_grad():
        full_logits = model(input_ids=torch.tensor([example.with_ids])).logits[0, -1]
        without = torch.tensor([example.without_ids])
        plain_logits = model(input_ids=without).logits[0, -1]
        with apply_static_patch(model, static, everywhere=True):
            patched_logits = model(input_ids=without).logits[0, -1]
    assert (plain_logits - full_logits).abs().max() > 1e-3
    assert (patched_logits - full_logits).abs().max() < 1e-4
    assert static.rank == 1  # one query: rank 1 whatever was asked


@pytest.mark.parametrize("family", EXPORTABLE)
def test_the_peft_adapter_loads_without_missing_keys_and_acts_as_the_patch(family, tmp_path):
    from peft import PeftModel

    model = tiny_model(family)
    static = fit_static_patch(memory_patches(model, [4, 5, 6]), rank=2)
    directory = export_lora(model, static, tmp_path / "adapter", base_model=f"tiny-{family}",
                            metadata={"memory_id": 1})
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 2 and config["lora_bias"] is True
    probe = torch.randint(1, VOCAB, (1, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        base_logits = model(input_ids=probe).logits
        with apply_static_patch(model, static, everywhere=True):
            hooked_logits = model(input_ids=probe).logits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(directory))
    # PEFT reports missing or unexpected adapter keys as a warning: here that is a failure. (PEFT also
    # calls a transformers property that transformers 5 deprecates; that warning is not about the adapter.)
    assert not [str(warning.message) for warning in caught if "keys" in str(warning.message)]
    with torch.no_grad():
        peft_logits = peft_model(input_ids=probe).logits
    assert (hooked_logits - base_logits).abs().max() > 1e-3
    torch.testing.assert_close(peft_logits, hooked_logits, rtol=1e-5, atol=1e-5)


def test_gemma_export_is_refused_with_the_reason(tmp_path):
    model = tiny_model("gemma2")
    static = fit_static_patch(memory_patches(model, [4]), rank=1)
    with pytest.raises(UnsupportedArchitectureError, match="gemma.*post_feedforward_layernorm"):
        export_lora(model, static, tmp_path / "adapter", base_model="tiny-gemma2")
    assert not (tmp_path / "adapter").exists()
