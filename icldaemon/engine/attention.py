"""Attention over query copies in row blocks, each against only the keys its rows may see.

A chunk of copies is one forward pass whose rows see very different key ranges: the copy of prefix i
sees the first A + i cached keys, a hybrid copy only the anchor. One dense masked attention computes
every row against every key and throws most away. Under `blocked_attention(model, plan)`, each
attention call instead runs the model's own SDPA attention once per row block, on the key columns
the plan lists for it; the dense mask is sliced, not rebuilt, so windows and causality are kept. A
block whose rows each see the same few keys and one key of their own (the hybrid copies: the anchor
and the no-context query tokens, then themselves) is computed directly, scores against the shared
keys and the diagonal of its own, instead of against every sibling's key only to mask them out.
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
    own: slice | None = None  # columns of the rows' own keys, one per row in order, seen besides `keys`


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
        if block.own is not None:
            outputs.append(_shared_and_own(query, key, value, attention_mask, block, scaling))
            continue
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


def _shared_and_own(query, key, value, attention_mask, block: RowBlock, scaling):
    """Each row against the block's shared keys and its own key, in float32: [batch, heads, rows, head_dim]."""
    batch, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    rows = block.rows.stop - block.rows.start
    scale = scaling if scaling is not None else head_dim**-0.5
    # query head h reads key/value head h // (heads // kv_heads), as transformers' repeat_kv lays them out
    q = query[:, :, block.rows].float().reshape(batch, kv_heads, heads // kv_heads, rows, head_dim)
    shared_keys = torch.cat([key[:, :, columns] for columns in block.keys], dim=2).float()[:, :, None]
    shared_values = torch.cat([value[:, :, columns] for columns in block.keys], dim=2).float()[:, :, None]
    own_keys, own_values = key[:, :, block.own].float()[:, :, None], value[:, :, block.own].float()[:, :, None]
    shared = torch.matmul(q, shared_keys.transpose(-1, -2)) * scale  # [batch, kv_heads, group, rows, shared]
    own = (q * own_keys).sum(-1, keepdim=True) * scale  # [batch, kv_heads, group, rows, 1]
    if attention_mask is not None:
        rows_mask = attention_mask[:, :, block.rows]
        shared = shared + torch.cat([rows_mask[..., columns] for columns in block.keys], dim=-1).float()[:, :, None]
        own = own + rows_mask[..., block.own].diagonal(dim1=-2, dim2=-1).float()[:, :, None, :, None]
    weights = torch.softmax(torch.cat([shared, own], dim=-1), dim=-1)
    output = torch.matmul(weights[..., :-1], shared_values) + weights[..., -1:] * own_values
    return output.reshape(batch, heads, rows, head_dim).to(query.dtype)


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
