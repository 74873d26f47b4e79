"""The engine against the slow reference, on tiny random models of every supported family."""

import numpy as np
import pytest
import torch
import transformers
from engine_reference import NAMES, behavioural_kl, exact_patch, reference_dynamics, without

from icldaemon.engine import dense_factor
from icldaemon.engine.adapters import SUPPORTED_ARCHITECTURES, adapter_for
from icldaemon.engine.dense_factor import dense_factors
from icldaemon.engine.measure import measure, measured_prefixes
from icldaemon.engine.prompt import Segment, SegmentedPrompt

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256)

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(COMMON, num_key_value_heads=2)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(COMMON, num_key_value_heads=2, sliding_window=None)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(COMMON, num_key_value_heads=2)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(COMMON, num_key_value_heads=2,
                                                                           head_dim=8)),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               dict(COMMON, num_key_value_heads=2, head_dim=8, sliding_window=64)),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
               dict(COMMON, num_key_value_heads=2, head_dim=8, sliding_window=64)),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM,
             dict(COMMON, num_key_value_heads=4, pad_token_id=0)),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256)),
    "gpt_neox": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM,
                 dict(COMMON, use_parallel_residual=True)),
    # hybrids: Mamba2 pieces of 8 tokens (the prompts span several), weights large enough that the context's
    # effect stands well above float32 rounding, every muP multiplier away from 1
    "falcon_h1": (transformers.FalconH1Config, transformers.FalconH1ForCausalLM,
                  dict(COMMON, num_key_value_heads=2, head_dim=8, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                       mamba_d_state=8, mamba_n_groups=2, mamba_chunk_size=8, initializer_range=0.3,
                       mlp_multipliers=[0.7, 1.9], ssm_multipliers=[0.9, 1.1, 0.8, 1.2, 0.7], ssm_in_multiplier=1.3,
                       ssm_out_multiplier=0.8, attention_in_multiplier=1.2, attention_out_multiplier=0.9,
                       key_multiplier=0.8, embedding_multiplier=2.0, lm_head_multiplier=0.5)),
    "bamba": (transformers.BambaConfig, transformers.BambaForCausalLM,
              dict(COMMON, num_hidden_layers=3, num_key_value_heads=2, mamba_n_heads=4, mamba_d_head=16,
                   mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=8, attn_layer_indices=[1],
                   initializer_range=0.3)),
    "granitemoehybrid": (transformers.GraniteMoeHybridConfig, transformers.GraniteMoeHybridForCausalLM,
                         dict(COMMON, num_hidden_layers=3, shared_intermediate_size=64, num_key_value_heads=2,
                              mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1,
                              mamba_chunk_size=8, layer_types=["mamba", "attention", "mamba"], num_local_experts=0,
                              residual_multiplier=0.5, initializer_range=0.3)),
}
HYBRIDS = ("falcon_h1", "bamba", "granitemoehybrid")
TOLERANCE = dict(rtol=1e-4, atol=1e-6)


def check_tolerance(family: str) -> float:
    """The largest logit error the check may show: float32 rounding, at the SSM scan's floor for hybrids."""
    return 1e-4 if family in HYBRIDS else 1e-5


def tiny_model(family: str, seed: int = 0, **overrides):
    config_class, model_class, options = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_class(**{**options, **overrides})
    config._attn_implementation = "sdpa" if family not in ("gemma2",) else "eager"
    model = model_class(config).eval()
    if family in HYBRIDS:
        slow_decay(model)
    return model


def slow_decay(model) -> None:
    """Mamba2 steps near 0.05 and decay rates 0.3-1.5: the state carries the context across many pieces (the
    models' own initialisation forgets within a few tokens)."""
    with torch.no_grad():
        for mixer in adapter_for(model).mixers(model):
            mixer.dt_bias.fill_(-3.0)
            mixer.A_log.copy_(torch.log(torch.linspace(0.3, 1.5, mixer.num_heads)))


def segmented(length: int = 24, query_tokens: int = 1, seed: int = 1) -> SegmentedPrompt:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (length,), generator=generator).tolist()
    query = length - query_tokens
    return SegmentedPrompt(ids, [
        Segment("anchor", "anchor", 0, 2),
        Segment("context", "context", 2, 7),
        Segment("memory:1", "memory", 7, 12, memory_id=1, key="first"),
        Segment("context", "context", 12, 14),
        Segment("memory:2", "memory", 14, query, memory_id=2, key="second"),
        Segment("query", "query", query, length),
    ])


def test_every_supported_architecture_is_tested():
    tested = {adapter_for(tiny_model(family)).family for family in FAMILIES}
    from icldaemon.engine.adapters import ADAPTERS

    assert tested == {adapter.family for adapter in ADAPTERS}
    assert len(SUPPORTED_ARCHITECTURES) >= 12


@pytest.mark.parametrize("path", ["dense factor", "W delta"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dynamics_match_the_reference(family, path, monkeypatch):
    model, prompt = tiny_model(family), segmented()
    if path == "W delta":  # the path of models whose factors would take too much memory
        monkeypatch.setattr(dense_factor, "MEMORY_SHARE", 0.0)
    assert (dense_factors(model, adapter_for(model)) is not None) == (path == "dense factor")
    measurement = measure(model, prompt, chunk_copies=7)
    expected = reference_dynamics(model, prompt)
    for name in NAMES:
        np.testing.assert_allclose(measurement.dynamics[name], expected[name], err_msg=name, **TOLERANCE)
    assert measurement.exactness["max_abs_logit_error"] < check_tolerance(family)
    assert measurement.exactness["kl"] < 1e-8


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_segment_attribution_matches_the_reference(family):
    model, prompt = tiny_model(family), segmented()
    measurement = measure(model, prompt)
    ids = prompt.input_ids
    assert [segment.label for segment in measurement.segments] == ["memory:1", "memory:2"]
    for segment in measurement.segments:
        closed_up = without(ids, segment.start, segment.end)
        patches = exact_patch(model, ids, closed_up)
        ablation = segment.ablation
        np.testing.assert_allclose(
            ablation.update_frobenius_norm, [float(torch.linalg.matrix_norm(p[0])) for p in patches], **TOLERANCE
        )
        np.testing.assert_allclose(ablation.bias_update_norm, [float(p[1].norm()) for p in patches], **TOLERANCE)
        np.testing.assert_allclose(ablation.delta, np.stack([p[2].numpy() for p in patches]), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ablation.a_tilde, np.stack([p[3].numpy() for p in patches]), rtol=1e-4, atol=1e-5)
        assert ablation.kl == pytest.approx(behavioural_kl(model, ids, closed_up), rel=1e-3, abs=1e-9)
        assert ablation.kl > 0
        assert ablation.max_abs_logit_error < check_tolerance(family)


def test_parallel_residual_puts_the_whole_effect_in_the_bias_patch():
    measurement = measure(tiny_model("gpt_neox"), segmented())
    assert np.nanmax(measurement.dynamics["delta_norm"]) < 1e-5
    assert np.nanmax(measurement.dynamics["update_frobenius_norm"]) < 1e-5
    assert np.nanmin(measurement.dynamics["bias_update_norm"]) > 1e-3


def test_first_layer_learning_rate_does_not_depend_on_the_prefix():
    measurement = measure(tiny_model("llama"), segmented())
    first = measurement.dynamics["implicit_learning_rate"][0]
    np.testing.assert_allclose(first, first[0], rtol=1e-6)
    assert np.ptp(measurement.dynamics["implicit_learning_rate"][1]) > 0


@pytest.mark.parametrize("query_tokens", [2, 4])
def test_multi_token_queries_match_the_reference(query_tokens):
    model, prompt = tiny_model("qwen2"), segmented(length=26, query_tokens=query_tokens)
    measurement = measure(model, prompt, chunk_copies=5)
    expected = reference_dynamics(model, prompt)
    for name in NAMES:
        np.testing.assert_allclose(measurement.dynamics[name], expected[name], err_msg=name, **TOLERANCE)


def test_stride_measures_boundaries_and_marginals_between_measured_prefixes():
    model, prompt = tiny_model("llama"), segmented(length=30)
    prefixes = measured_prefixes(prompt, stride=4)
    anchor = prompt.anchor_tokens
    boundaries = {s.end - anchor for s in prompt.segments[1:-1]} | {s.start - anchor for s in prompt.segments[2:-1]}
    assert boundaries <= set(prefixes)
    assert {4, 8, 12} <= set(prefixes) and 3 not in prefixes
    measurement = measure(model, prompt, stride=4, chunk_copies=3)
    expected = reference_dynamics(model, prompt, prefixes)
    for name in NAMES:
        np.testing.assert_allclose(measurement.dynamics[name], expected[name], err_msg=name, **TOLERANCE)
    assert np.isnan(measurement.dynamics["delta_norm"][:, 2]).all()


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_sliding_window_layers_see_only_their_window(family):
    model, prompt = tiny_model(family, sliding_window=5), segmented(length=24)
    measurement = measure(model, prompt, chunk_copies=6)
    expected = reference_dynamics(model, prompt)
    for name in NAMES:
        np.testing.assert_allclose(measurement.dynamics[name], expected[name], err_msg=name, **TOLERANCE)
    assert measurement.exactness["max_abs_logit_error"] < 1e-5


def test_chunk_size_does_not_change_the_result():
    model, prompt = tiny_model("llama"), segmented()
    one = measure(model, prompt, chunk_copies=1, attribute_segments=False)
    all_at_once = measure(model, prompt, chunk_copies=1000, attribute_segments=False)
    for name in NAMES:
        np.testing.assert_allclose(one.dynamics[name], all_at_once.dynamics[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_measures_and_reports_its_exactness(dtype):
    model = tiny_model("llama").to(dtype)
    measurement = measure(model, segmented())
    reference = measure(tiny_model("llama"), segmented())
    assert measurement.model["dtype"] == str(dtype).removeprefix("torch.")
    error = measurement.exactness["max_abs_logit_error"]
    assert np.isfinite(error) and 0 < error < 0.05
    # half precision tracks the float32 measurement to its own resolution
    np.testing.assert_allclose(measurement.dynamics["update_frobenius_norm"],
                               reference.dynamics["update_frobenius_norm"], rtol=0.1, atol=2e-3)


def truncated(prompt: SegmentedPrompt, prefix: int) -> SegmentedPrompt:
    """The prompt a user would have written with only c_1..c_prefix: anchor, those tokens, then the query."""
    anchor, query = prompt.anchor_tokens, prompt.query_position
    ids = prompt.input_ids[: anchor + prefix] + prompt.input_ids[query:]
    return SegmentedPrompt(ids, [
        Segment("anchor", "anchor", 0, anchor),
        Segment("context", "context", anchor, anchor + prefix),
        Segment("query", "query", anchor + prefix, len(ids)),
    ])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prefix_i_is_the_prompt_truncated_after_token_i(family):
    """Column i of the whole measurement is the last column of measuring the truncated prompt on its own."""
    model, prompt = tiny_model(family), segmented(length=26, query_tokens=2)
    whole = measure(model, prompt, chunk_copies=6, attribute_segments=False)
    for prefix in (1, 5, 11, prompt.context_tokens - 3):
        alone = measure(model, truncated(prompt, prefix), attribute_segments=False)
        for name in NAMES:
            np.testing.assert_allclose(alone.dynamics[name][:, -1], whole.dynamics[name][:, prefix - 1],
                                       rtol=1e-5, atol=1e-7, err_msg=f"{name}, prefix {prefix}")


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3", "falcon_h1"])
def test_removing_a_memory_is_measuring_the_prompt_rebuilt_without_it(family):
    """A memory's KL is the KL between the measurement of the prompt and that of the prompt without it."""
    model, prompt = tiny_model(family), segmented()
    whole = measure(model, prompt, plain_forward_repeats=0)
    for segment in whole.segments:
        ids = without(prompt.input_ids, segment.start, segment.end)
        rebuilt = SegmentedPrompt(ids, [
            Segment("anchor", "anchor", 0, prompt.anchor_tokens),
            Segment("context", "context", prompt.anchor_tokens, prompt.query_position - (segment.end - segment.start)),
            Segment("query", "query", prompt.query_position - (segment.end - segment.start), len(ids)),
        ])
        alone = measure(model, rebuilt, attribute_segments=False, plain_forward_repeats=0)
        log_p, log_q = whole.log_probs, alone.log_probs
        assert segment.ablation.kl == pytest.approx(float(np.sum(np.exp(log_p) * (log_p - log_q))), rel=1e-6)
        assert segment.ablation.kl > 0
        assert segment.ablation.max_abs_logit_error < check_tolerance(family)

