"""Hybrid attention + Mamba2 models: the dual form against the slow reference, where only the SSM carries the
context, over many pieces, and the scope of the replaced mixers. The families' common tests (dynamics and
attribution against the reference, prefix i alone) are in test_engine_families.py."""

import numpy as np
import pytest
import torch
import transformers
from engine_reference import NAMES, reference_dynamics
from test_engine_families import TOLERANCE, VOCAB, segmented, tiny_model
from transformers import DynamicCache

from icldaemon.engine.adapters import adapter_for
from icldaemon.engine.measure import measure, measured_prefixes
from icldaemon.engine.prompt import Segment, SegmentedPrompt
from icldaemon.engine.state_space import dual_form
from icldaemon.exceptions import UnsupportedArchitectureError

HYBRID_CHECK = 1e-4  # docs/method.md §8.4: the check's tolerance for hybrids, at the SSM scan's float32 floor


def long_prompt(length: int, seed: int = 5) -> SegmentedPrompt:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (length,), generator=generator).tolist()
    return SegmentedPrompt(ids, [Segment("anchor", "anchor", 0, 3), Segment("context", "context", 3, length - 2),
                                 Segment("query", "query", length - 2, length)])


def test_attention_off_the_context_reaches_the_query_through_mamba2_alone():
    """Attention's output multiplied by 0: every prefix's effect is the dual form's (context, boundary states)."""
    model, prompt = tiny_model("falcon_h1", attention_out_multiplier=0.0), segmented(length=26, query_tokens=2)
    measurement = measure(model, prompt, chunk_copies=6)
    expected = reference_dynamics(model, prompt)
    for name in NAMES:
        np.testing.assert_allclose(measurement.dynamics[name], expected[name], err_msg=name, **TOLERANCE)
    assert np.nanmin(measurement.dynamics["delta_norm"][1]) > 1e-2  # the context moved the query's MLP input
    assert measurement.context_ablation.kl > 1e-2
    assert measurement.exactness["max_abs_logit_error"] < HYBRID_CHECK
    for segment in measurement.segments:
        assert segment.ablation.max_abs_logit_error < HYBRID_CHECK


def test_the_gated_norm_variant_matches_the_reference():
    model, prompt = tiny_model("falcon_h1", mamba_rms_norm=True), segmented()
    measurement = measure(model, prompt, chunk_copies=5)
    expected = reference_dynamics(model, prompt)
    for name in NAMES:
        np.testing.assert_allclose(measurement.dynamics[name], expected[name], err_msg=name, **TOLERANCE)
    assert measurement.exactness["max_abs_logit_error"] < HYBRID_CHECK


@pytest.mark.parametrize("family", ["falcon_h1", "bamba"])
def test_a_long_prompt_over_many_pieces_with_a_stride(family):
    """58 context tokens in pieces of 8, every third prefix, chunks of 4 copies: rows of one chunk read
    different boundary states and different stretches of the context."""
    model, prompt = tiny_model(family), long_prompt(63)
    prefixes = measured_prefixes(prompt, stride=3)
    measurement = measure(model, prompt, stride=3, chunk_copies=4, attribute_segments=False)
    expected = reference_dynamics(model, prompt, prefixes)
    for name in NAMES:
        np.testing.assert_allclose(measurement.dynamics[name], expected[name], err_msg=name, **TOLERANCE)
    assert measurement.exactness["max_abs_logit_error"] < HYBRID_CHECK


def test_the_dual_form_runs_the_model_as_its_own_code_does():
    model = tiny_model("falcon_h1")
    ids = torch.tensor([long_prompt(40).input_ids])
    mixers = adapter_for(model).mixers(model)
    with torch.no_grad():
        own = model(ids).logits
        with dual_form(model, adapter_for(model)):
            assert all("forward" in vars(mixer) for mixer in mixers)
            dual = model(ids, past_key_values=DynamicCache(), use_cache=True).logits
    torch.testing.assert_close(dual, own, rtol=1e-5, atol=1e-5)
    assert not any("forward" in vars(mixer) for mixer in mixers)


def test_the_mixers_are_restored_after_an_exception():
    model = tiny_model("bamba")
    mixers = adapter_for(model).mixers(model)
    with pytest.raises(RuntimeError, match="inside"):
        with dual_form(model, adapter_for(model)):
            raise RuntimeError("inside")
    assert mixers and not any("forward" in vars(mixer) for mixer in mixers)


@pytest.mark.parametrize(("config_class", "model_class", "options", "reason"), [
    (transformers.JambaConfig, transformers.JambaForCausalLM,
     dict(num_key_value_heads=2, num_experts=1, mamba_d_state=8, mamba_dt_rank=4, attn_layer_period=2,
          attn_layer_offset=1), "Mamba1"),
    (transformers.Qwen3NextConfig, transformers.Qwen3NextForCausalLM,
     dict(num_key_value_heads=2, head_dim=8, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8,
          linear_value_head_dim=8, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
          shared_expert_intermediate_size=16), "gated-delta-rule"),
    (transformers.GraniteMoeHybridConfig, transformers.GraniteMoeHybridForCausalLM,
     dict(num_key_value_heads=2, shared_intermediate_size=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
          layer_types=["mamba", "attention"], num_local_experts=2, num_experts_per_tok=1), "routed experts"),
], ids=["jamba", "qwen3_next", "granitemoehybrid_moe"])
def test_other_recurrent_families_are_refused_by_name_with_the_reason(config_class, model_class, options, reason):
    config = config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, **options)
    model = model_class(config).eval()
    with pytest.raises(UnsupportedArchitectureError, match=reason):
        adapter_for(model)
