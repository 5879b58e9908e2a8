"""Optional backend: fla's (flash-linear-attention) Triton kernel for the chunkwise causal form.

fla ships fused chunkwise kernels for *unnormalised* causal linear attention
(``o_i = sum_{j<=i} (q_i . k_j) v_j``) with an initial and final state. T2R
needs the normalised form with a floored denominator and padded keys removed
in feature space, so this wrapper reuses the kernel exactly as the pure-torch
path uses its matmuls: padded keys are zeroed before the call, the normaliser
rides along as an extra all-ones value column (numerator and denominator come
out of one kernel), the state is ``[S | z]`` in fp32, and the division by
``max(denominator, eps)`` happens afterwards. The result is the same function
as :func:`t2r_fairseq.ops.linear_attention.causal_linear_attention`'s torch
path (tests compare them where CUDA and fla are present).

Install with ``pip install -e '.[fla]'`` on a CUDA machine. fla's Triton kernels
need a GPU; on the CPU, or when fla is absent, ``backend="fla"`` refuses with one
line. This kernel has not been verified on a GPU yet (on an H200 its first call,
the Triton compilation, had not returned after 95 s), so only an explicit
``backend="fla"`` (``--linear-kernel fla``) calls it; ``"auto"`` is the torch path
until :data:`t2r_fairseq.ops.linear_attention.FLA_VERIFIED` is set.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from typing import Optional

import torch
from torch import Tensor


@functools.lru_cache(maxsize=None)
def _fla_kernel():  # noqa: ANN202 - fla's function
    """fla's ``chunk_linear_attn`` and whether it takes ``head_first`` (older releases default to head-first)."""
    from fla.ops.linear_attn import chunk_linear_attn

    return chunk_linear_attn, "head_first" in inspect.signature(chunk_linear_attn).parameters


@functools.lru_cache(maxsize=None)
def installed() -> bool:
    """True when the ``fla`` package can be imported (it may still need a GPU to run)."""
    return importlib.util.find_spec("fla") is not None


def available(device: torch.device) -> bool:
    """True when the fla kernel can run on ``device``: fla installed and a CUDA tensor."""
    if device.type != "cuda" or not installed():
        return False
    try:
        _fla_kernel()
    except Exception:  # noqa: BLE001 - any import failure (triton missing, API moved) means: not available
        return False
    return True


def fla_causal_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Optional[Tensor],
    initial_state: Optional[tuple[Tensor, Tensor]],
    output_final_state: bool,
    eps: float,
) -> tuple[Tensor, Optional[tuple[Tensor, Tensor]]]:
    """``causal_linear_attention`` through fla; same layouts: ``q, k [B, H, L, K]``, ``v [B, H, L, D]``.

    Returns ``(out [B, H, L, D], (S, z) or None)``; fp32 inside, output in ``v``'s dtype.
    """
    kernel, takes_head_first = _fla_kernel()
    B, H, L, _ = q.shape
    D = v.size(-1)
    kf = k.float()
    if key_padding_mask is not None:
        kf = kf.masked_fill(key_padding_mask[:, None, :, None].to(torch.bool), 0.0)
    vf = torch.cat([v.float(), v.new_ones((B, H, L, 1), dtype=torch.float32)], dim=-1)
    # fla's current layout is [B, L, H, K]
    qs, ks, vs = (x.transpose(1, 2).contiguous() for x in (q.float(), kf, vf))
    h0 = None
    if initial_state is not None:
        S, z = initial_state
        h0 = torch.cat([S.float(), z.float().unsqueeze(-1)], dim=-1).contiguous()  # [B, H, K, D+1]
    kwargs = {"scale": 1.0, "initial_state": h0, "output_final_state": output_final_state, "normalize": False}
    if takes_head_first:
        kwargs["head_first"] = False
    o, ht = kernel(qs, ks, vs, **kwargs)
    o = o.transpose(1, 2).float()  # [B, H, L, D+1]
    out = (o[..., :D] / o[..., D:].clamp_min(eps)).to(v.dtype)
    final = None
    if output_final_state:
        final = (ht[..., :D].float().contiguous(), ht[..., D].float().contiguous())
    return out, final
