"""R factors of the first dense layers: ||W d|| = ||d @ R^T||, cached per model, renewed when a weight changes."""

import torch
import transformers

from icldaemon.engine.adapters import adapter_for
from icldaemon.engine.dense_factor import dense_factors


def _model(config_class, model_class, **options):
    torch.manual_seed(0)
    return model_class(config_class(vocab_size=50, num_hidden_layers=2, **options)).eval()


def _llama():
    return _model(transformers.LlamaConfig, transformers.LlamaForCausalLM, hidden_size=16, intermediate_size=40,
                  num_attention_heads=2)


def _stacked(model, layer):
    block = adapter_for(model).blocks(model)[layer]
    return torch.cat([block.mlp.gate_proj.weight, block.mlp.up_proj.weight]).double()


def test_the_factor_preserves_every_inner_product_of_w_delta():
    model = _llama()
    factors = dense_factors(model, adapter_for(model))
    d = torch.randn(5, 16, dtype=torch.float64)
    for layer, factor in enumerate(factors):
        u = d @ _stacked(model, layer).T
        v = d @ factor.double()
        torch.testing.assert_close(v @ v.T, u @ u.T, rtol=1e-5, atol=1e-6)


def test_gpt2_conv1d_weights_are_read_transposed():
    model = _model(transformers.GPT2Config, transformers.GPT2LMHeadModel, n_embd=16, n_head=2)
    factor = dense_factors(model, adapter_for(model))[0].double()
    d = torch.randn(4, 16, dtype=torch.float64)
    u = d @ model.transformer.h[0].mlp.c_fc.weight.double()  # Conv1D: [in, out]
    torch.testing.assert_close((d @ factor) @ (d @ factor).T, u @ u.T, rtol=1e-5, atol=1e-6)


def test_factors_are_cached_and_renewed_when_a_weight_changes_even_through_data():
    model = _llama()
    adapter = adapter_for(model)
    first = dense_factors(model, adapter)
    assert dense_factors(model, adapter) is first
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.data[0] += 1.0  # as a merged adapter does: no version bump
    renewed = dense_factors(model, adapter)
    assert renewed is not first
    d = torch.randn(3, 16, dtype=torch.float64)
    u = d @ _stacked(model, 1).T
    torch.testing.assert_close((d @ renewed[1].double()) @ (d @ renewed[1].double()).T, u @ u.T, rtol=1e-5, atol=1e-6)


def test_no_factors_where_they_would_outweigh_their_share_of_memory():
    # hidden 256 against a 64-wide MLP and a small vocabulary: R (256 x 256 per layer) is most of the model
    model = _model(transformers.LlamaConfig, transformers.LlamaForCausalLM, hidden_size=256, intermediate_size=64,
                   num_attention_heads=2)
    assert dense_factors(model, adapter_for(model)) is None
