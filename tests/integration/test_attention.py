"""blocked_attention swaps the model's attention function for its block only and restores what was there."""

import pytest
from test_engine_families import tiny_model

from icldaemon.engine.attention import BLOCKED_ATTENTION, RowBlock, blocked_attention


def test_the_attention_implementation_is_restored_also_after_an_error():
    model = tiny_model("llama")
    before = model.config._attn_implementation
    plan = [RowBlock(rows=slice(0, 1), keys=(slice(0, 1),))]
    with blocked_attention(model, plan):
        assert model.config._attn_implementation == BLOCKED_ATTENTION
    assert model.config._attn_implementation == before
    with pytest.raises(RuntimeError, match="inside"), blocked_attention(model, plan):
        raise RuntimeError("inside")
    assert model.config._attn_implementation == before


def test_a_model_not_on_sdpa_is_left_alone():
    model = tiny_model("gemma2")  # eager attention (softcapping)
    with blocked_attention(model, [RowBlock(rows=slice(0, 1), keys=(slice(0, 1),))]):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "eager"
