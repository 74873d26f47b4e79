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


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2)])
def test_rows_with_shared_keys_and_their_own_equal_dense_masked_attention(heads, kv_heads):
    """The hybrid copies' block: rows see the shared keys (some masked, as a window would) and their own key."""
    import torch

    from icldaemon.engine.attention import _row_blocked_sdpa

    torch.manual_seed(0)
    shared, rows, dim = 5, 7, 8
    total = shared + rows
    query = torch.randn(1, heads, rows, dim)
    key, value = torch.randn(1, kv_heads, total, dim), torch.randn(1, kv_heads, total, dim)
    allowed = torch.zeros(rows, total, dtype=torch.bool)
    allowed[:, :shared] = True
    allowed[2, :3] = False  # a row that sees only part of the shared keys
    allowed[torch.arange(rows), shared + torch.arange(rows)] = True
    mask = torch.zeros(rows, total).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(heads // kv_heads, 1), value.repeat_interleave(heads // kv_heads, 1), mask)
    plan = [RowBlock(rows=slice(0, rows), keys=(slice(0, shared),), own=slice(shared, total))]
    model = tiny_model("llama")
    with blocked_attention(model, plan):
        output, _ = _row_blocked_sdpa(None, query, key, value, mask)
    torch.testing.assert_close(output, expected.transpose(1, 2), rtol=1e-5, atol=1e-6)
