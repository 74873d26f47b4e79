"""The first dense layers' R factor: ||W d|| = ||R d|| with R square, d_model x d_model (docs/method.md §3).

The per-token dynamics need, for every prefix, only inner products of u_i = W delta_i (its norm and its
product with the next prefix's), never u itself. With the thin QR factorisation W = Q R (W the first
dense layers stacked, d_ff_total x d_model; Q has orthonormal columns), u_i . u_j = (R delta_i) . (R delta_j),
and R delta costs d_model^2 per prefix instead of d_ff_total x d_model: five times less on a gated MLP
with d_ff = 2.7 d_model, and the hybrid copies then skip their MLP entirely.

R is computed once per model in float64 and kept in float32 (its rounding error grows with the
condition number of W, as that of W delta in float32 does, not with its square as the Gram matrix
W^T W's would). It is cached per model and recomputed when a first dense weight changes (a merged
adapter, say): the cache key has each weight's storage, version counter, sum and norm, so a change
made through `.data` (which keeps the version counter) is seen too. Where the factors would take more
than `MEMORY_SHARE` of the parameters' bytes (d_model large against the model), there are none and the
engine computes W delta itself.
"""

import weakref

import torch
from torch import nn

from icldaemon.engine.adapters import ArchitectureAdapter

MEMORY_SHARE = 0.125  # the factors' bytes at most this share of the parameters' bytes
FACTOR_DTYPE = torch.float32

_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, list[torch.Tensor] | None]]" = weakref.WeakKeyDictionary()


def _weights(model: nn.Module, adapter: ArchitectureAdapter) -> list[list[torch.Tensor]] | None:
    """Per block, the first dense layers' weights as [out, in]; None where one is not a plain dense matrix."""
    layers = []
    for block in adapter.blocks(model):
        weights = [adapter.dense_weight(block.get_submodule(path)) for path in adapter.first_dense]
        if any(weight is None for weight in weights):
            return None
        layers.append(weights)
    return layers


def _key(layers: list[list[torch.Tensor]]) -> tuple:
    with torch.no_grad():
        return tuple(
            (weight.data_ptr(), weight._version, float(weight.sum()), float(torch.linalg.vector_norm(weight)))
            for weights in layers for weight in weights
        )


def _fits(model: nn.Module, layers: list[list[torch.Tensor]]) -> bool:
    parameter_bytes = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    d_model = layers[0][0].shape[1]
    factor_bytes = len(layers) * d_model * d_model * torch.finfo(FACTOR_DTYPE).bits // 8
    return factor_bytes <= MEMORY_SHARE * parameter_bytes


def dense_factors(model: nn.Module, adapter: ArchitectureAdapter) -> list[torch.Tensor] | None:
    """Per layer, R^T ([d_model, d_model], float32, on the model's device) with ||W d|| = ||d @ R^T||; or None."""
    layers = _weights(model, adapter)
    if not layers or not _fits(model, layers):
        return None
    key = _key(layers)
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    factors = []
    with torch.no_grad():
        for weights in layers:
            stacked = torch.cat([weight.to(torch.float64) for weight in weights], dim=0)  # [d_ff_total, d_model]
            r = torch.linalg.qr(stacked, mode="r").R  # [d_model, d_model], upper triangular
            factors.append(r.T.to(FACTOR_DTYPE).contiguous())
    _CACHE[model] = (key, factors)
    return factors
