"""The generation-time fused projection of a linear attention layer, as a cache of its own.

A decode step is bound by reading weights and by the number of small kernels, not by arithmetic. In inference
(eval mode, no autograd) with an incremental state, the q/k/v projections run as one matmul, and when the feature
map starts with a per-head affine layer (T2R, Hedgehog) that layer is folded into the q and k projections:
``W_phi (s W_q x + s b_q) + b_phi = (s W_phi W_q) x + (s W_phi b_q + b_phi)``. With ``k < head_dim`` the folded
matrix is smaller than ``W_q`` itself, so T2R's feature map costs less than nothing in the projection.

The folded weights are derived from the layer's parameters, never stored in checkpoints (this object is not a
module), and recomputed whenever a parameter changes: the cache key holds each tensor's storage pointer and
version counter, which every in-place update (optimizer step, ``load_state_dict``) bumps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class FusedWeights:
    """q(/k/v) projections as one ``(weight, bias)``, with the feature map's affine prefix folded in when ``folded``."""

    weight: Tensor
    bias: Tensor
    sizes: List[int]
    folded: bool


class FusedProjection:
    """Per-role cache (``'qkv'``: a self-attention step; ``'q'``: a cross-attention step) of one layer's fused weights.

    ``layer`` is passed to every call rather than stored, so the cache holds no reference to its module.
    """

    def __init__(self) -> None:
        self._cache: Dict[str, Tuple[tuple, FusedWeights]] = {}

    def cached(self) -> List[FusedWeights]:
        """What is cached now (tests and diagnostics)."""
        return [weights for _, weights in self._cache.values()]

    def weights(self, layer: nn.Module, role: str, fold_map: bool) -> FusedWeights:
        """The fused weights of ``layer`` for ``role``; the feature map folded in when ``fold_map`` and it has an
        affine prefix. Recomputed only when one of the tensors it derives from changed."""
        tensors = [layer.q_proj.weight, layer.q_proj.bias, *layer.feature_map.parameters(), *layer.feature_map.buffers()]
        if role == "qkv":
            tensors += [layer.k_proj.weight, layer.k_proj.bias, layer.v_proj.weight, layer.v_proj.bias]
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors if t is not None)
        hit = self._cache.get(role)
        if hit is not None and hit[0] == key:
            return hit[1]
        folded = fold_map and layer.feature_map.affine_prefix() is not None
        with torch.no_grad():
            parts = [_fold(layer, layer.q_proj, layer.scaling, folded, is_query=True)]
            if role == "qkv":
                parts += [_fold(layer, layer.k_proj, 1.0, folded, is_query=False), _fold(layer, layer.v_proj, 1.0, False)]
            fused = FusedWeights(
                weight=torch.cat([w for w, _ in parts]).contiguous(),
                bias=torch.cat([b for _, b in parts]).contiguous(),
                sizes=[w.size(0) for w, _ in parts],
                folded=folded,
            )
        self._cache[role] = (key, fused)
        return fused

    def __call__(self, layer: nn.Module, x: Tensor, role: str, fold_map: bool) -> Tuple[List[Tensor], bool]:
        """``x [T, B, C]`` through the fused weights: the per-part outputs (time-major) and whether the map's
        affine prefix was folded in (then only its activation is left to apply)."""
        hit = self._cache.get(role)
        if hit is not None and torch.compiler.is_compiling():
            # Inside generation's compiled step (modules.decode_step): the runner validated this cache before the
            # step was traced (validating here compares storage pointers, which torch.compile cannot trace).
            fused = hit[1]
        else:
            fused = self.weights(layer, role, fold_map)
        return list(F.linear(x, fused.weight, fused.bias).split(fused.sizes, dim=-1)), fused.folded

    def __deepcopy__(self, memo: dict) -> "FusedProjection":
        return FusedProjection()  # a copy re-derives its own weights (a cache keyed by the original's storage)


def _fold(layer: nn.Module, proj: nn.Linear, scale: float, fold_map: bool, is_query: bool = True) -> Tuple[Tensor, Tensor]:
    """``proj`` (times ``scale``) as one ``(weight, bias)``, composed with the map's affine prefix (the queries' or
    the keys' side) if asked."""
    weight = proj.weight * scale
    bias = proj.bias * scale if proj.bias is not None else weight.new_zeros(weight.size(0))
    prefix: Optional[Tuple[Tensor, Optional[Tensor]]] = layer.feature_map.affine_prefix(is_query) if fold_map else None
    if prefix is None:
        return weight, bias
    w_phi, b_phi = prefix  # [H, k, d], [H, k]
    H, d = layer.num_heads, layer.head_dim
    weight = torch.matmul(w_phi, weight.view(H, d, -1)).flatten(0, 1)  # [H*k, C_in]
    bias = torch.matmul(w_phi, bias.view(H, d, 1)).flatten()
    if b_phi is not None:
        bias = bias + b_phi.flatten()
    return weight, bias
