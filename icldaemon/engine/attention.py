"""Attention over query copies in row blocks, each against only the keys its rows may see.

A chunk of copies is one forward pass whose rows see very different key ranges: the copy of prefix i
sees the first A + i cached keys, a hybrid copy only the anchor. One dense masked attention computes
every row against every key and throws most away. Under `blocked_attention(model, plan)`, each
attention call instead runs the model's own SDPA attention once per row block, on the key columns
the plan lists for it; the dense mask is sliced, not rebuilt, so windows and causality are kept.
Registered through transformers' AttentionInterface (not a patch of the model's code); models whose
attention is not SDPA (eager with softcapping, say) keep the dense path.
"""

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

BLOCKED_ATTENTION = "icldaemon_row_blocks"


@dataclass(frozen=True)
class RowBlock:
    rows: slice  # rows among the forward pass's new tokens
    keys: tuple[slice, ...]  # columns of the full key axis (cached keys, then the new tokens)


_PLAN: ContextVar[list[RowBlock] | None] = ContextVar("icldaemon_attention_plan", default=None)


def _row_blocked_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    plan = _PLAN.get()
    if plan is None or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    # torch's SDPA directly: with a mask, transformers' wrapper repeats grouped key/value heads into
    # copies, which enable_gqa avoids
    grouped = key.shape[1] != query.shape[1]
    outputs = []
    for block in plan:
        block_keys = torch.cat([key[:, :, columns] for columns in block.keys], dim=2)
        block_values = torch.cat([value[:, :, columns] for columns in block.keys], dim=2)
        block_mask = None
        if attention_mask is not None:
            block_mask = torch.cat([attention_mask[:, :, block.rows, columns] for columns in block.keys], dim=-1)
        output = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, block.rows], block_keys, block_values, attn_mask=block_mask, scale=scaling,
            enable_gqa=grouped,
        )  # [batch, heads, rows, head_dim]
        outputs.append(output)
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(BLOCKED_ATTENTION, _row_blocked_sdpa)


def supports_blocked_attention(model) -> bool:
    return getattr(model.config, "_attn_implementation", None) == "sdpa"


@contextmanager
def blocked_attention(model, plan: list[RowBlock]):
    """Run the model's attention in the plan's row blocks (a no-op for models not on SDPA)."""
    if not supports_blocked_attention(model):
        yield
        return
    # The config's attribute rather than model.set_attn_implementation: that re-checks the model's support
    # and recurses into sub-models on every call, for a swap that lasts one chunk. Restored as it was.
    config = model.config
    previous = config._attn_implementation
    token = _PLAN.set(plan)
    config._attn_implementation = BLOCKED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
        _PLAN.reset(token)
