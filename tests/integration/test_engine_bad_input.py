"""Bad input to the engine: one clear error naming the input and the limit, never a bare traceback."""

import pytest
import torch
import transformers
from test_engine_families import segmented, tiny_model

from icldaemon.engine.loading import load_model
from icldaemon.engine.measure import measure
from icldaemon.exceptions import BadInputError, ModelLoadError, NumericalError, UnsupportedArchitectureError


def test_unsupported_architecture_names_itself_and_the_supported_list():
    config = transformers.OPTConfig(vocab_size=97, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=32)
    model = transformers.OPTForCausalLM(config).eval()
    with pytest.raises(UnsupportedArchitectureError, match=r"OPTForCausalLM is not supported; supported: .*"
                                                           r"LlamaForCausalLM"):
        measure(model, segmented())


def test_prompt_longer_than_the_models_positions():
    model = tiny_model("llama", max_position_embeddings=16)
    with pytest.raises(BadInputError, match="the prompt has 24 tokens; the model's context is 16"):
        measure(model, segmented(length=24))


def test_token_ids_outside_the_vocabulary():
    prompt = segmented()
    prompt.input_ids[3] = 5000
    with pytest.raises(BadInputError, match="outside the model's vocabulary of 97"):
        measure(tiny_model("llama"), prompt)


def test_non_finite_activations_are_named():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(NumericalError, match="non-finite values in the layer input at layer 1"):
        measure(model, segmented())


def test_unknown_model_path(tmp_path):
    with pytest.raises(ModelLoadError, match="was read as a path .* does not exist"):
        load_model(str(tmp_path / "nowhere"), models_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="is not a model directory"):
        load_model(str(tmp_path / "empty"), models_dir=tmp_path)


def test_bad_stride():
    with pytest.raises(BadInputError, match="stride must be at least 1, got 0"):
        measure(tiny_model("llama"), segmented(), stride=0)
