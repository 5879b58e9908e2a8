"""Kernelised (linear) attention as pure tensor functions.

Everything here works on *feature-mapped* queries and keys, i.e. ``phi(q)`` and
``phi(k)`` have already been computed, in the head-first layout::

    q, k : [B, H, L, K]   (K = feature dimension)
    v    : [B, H, L, D]
    key_padding_mask : [B, L] bool, True where the position is padding

and computes

    out_i = phi(q_i)^T S_i / max(phi(q_i)^T z_i, eps)
    S_i = sum_{j in keys(i)} phi(k_j) v_j^T      z_i = sum_{j in keys(i)} phi(k_j)

with ``keys(i) = {j <= i}`` for causal attention and all non-padded ``j`` for
cross attention. There are no fairseq imports: the same functions serve
training (chunkwise parallel form), generation (single recurrent step) and the
tests, where the naive O(L^2) versions below are the oracles.

Numerics: the recurrent state ``(S, z)`` and every reduction are carried in
fp32 whatever the input dtype, because bf16/fp16 sums over thousands of
positions lose the small contributions that distinguish one query from
another; outputs are cast back to the input dtype. The denominator is floored
at ``eps`` (1e-2 in the original T2R code) rather than merely offset, so a
query whose features are all zero (possible with ReLU maps) reads out zero
instead of dividing by a vanishing number.

Padding: padded keys are zeroed *in feature space*, so they contribute to
neither ``S`` nor ``z``. Masking only the values (a common shortcut) would
still count them in the normaliser.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

DEFAULT_EPS = 1e-2
DEFAULT_CHUNK_SIZE = 64
BACKENDS = ("auto", "torch", "fla")
# Whether backend="auto" may pick fla's kernel. False until a GPU run has checked it: set it (or narrow
# _auto_uses_fla to the devices and shapes measured) after its CUDA oracle tests (scripts/gpu_check.sh) pass, i.e. fla's
# kernel equals the torch path and is faster there. Unverified, its first call on an H200 (Triton compilation)
# had not returned after 95 s, so "auto" must not walk users into it.
FLA_VERIFIED = False
_fla_broken: Optional[str] = None  # set when fla failed once under backend="auto"; the torch path is used after


def _auto_uses_fla(q: Tensor) -> bool:
    """Whether ``backend="auto"`` tries fla for this call: the one place a verified GPU run changes.

    Today it is the pure-torch path everywhere (``FLA_VERIFIED`` is False); once fla is verified this is where
    the choice by device (and, if measured so, by shape) goes. Where fla is chosen but cannot run, or fails,
    :func:`_try_fla` still falls back to torch.
    """
    return FLA_VERIFIED and q.device.type == "cuda"


class LinearAttentionState(NamedTuple):
    """Recurrent state of one linear-attention layer, always fp32.

    S: [B, H, K, D] sum of phi(k) v^T over the keys seen so far.
    z: [B, H, K]    sum of phi(k) (the normaliser).
    """

    S: Tensor
    z: Tensor

    def index_select(self, dim: int, index: Tensor) -> "LinearAttentionState":
        return LinearAttentionState(self.S.index_select(dim, index), self.z.index_select(dim, index))


def _mask_keys(k: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
    """Zero the feature vectors of padded keys (mask: [B, L], True = pad)."""
    if key_padding_mask is None:
        return k
    if key_padding_mask.shape != (k.size(0), k.size(2)):
        raise ValueError(
            f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected "
            f"(batch, key_len) = {(k.size(0), k.size(2))}"
        )
    return k.masked_fill(key_padding_mask[:, None, :, None].to(torch.bool), 0.0)


def masked_keys(k: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
    """``k`` in fp32 with padded keys zeroed: what :func:`keys_linear_attention_readout` reads."""
    return _mask_keys(k.float(), key_padding_mask)


def _empty_state(q: Tensor, v: Tensor) -> LinearAttentionState:
    B, H, _, K = q.shape
    D = v.size(-1)
    return LinearAttentionState(
        q.new_zeros((B, H, K, D), dtype=torch.float32), q.new_zeros((B, H, K), dtype=torch.float32)
    )


# ---------------------------------------------------------------------------
# Non-causal (cross / encoder) attention: a state built once, then read out.
# ---------------------------------------------------------------------------


def linear_attention_state(
    k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None
) -> LinearAttentionState:
    """Summarise all (non-padded) keys and values into ``(S, z)`` in fp32.

    This is the cross-attention cache: computed once per source sentence and
    reused at every target step, so decoding never touches the source again.
    """
    k = _mask_keys(k.float(), key_padding_mask)
    return LinearAttentionState(torch.einsum("bhlk,bhld->bhkd", k, v.float()), k.sum(dim=2))


def linear_attention_readout(q: Tensor, state: LinearAttentionState, eps: float = DEFAULT_EPS) -> Tensor:
    """Read ``out = phi(q) S / max(phi(q) z, eps)`` for queries ``q: [B, H, T, K]``."""
    qf = q.float()
    num = torch.matmul(qf, state.S)
    den = torch.matmul(qf, state.z.unsqueeze(-1)).clamp_min(eps)
    return (num / den).to(q.dtype)


def grouped_linear_attention_readout(q: Tensor, state: LinearAttentionState, eps: float = DEFAULT_EPS) -> Tensor:
    """:func:`linear_attention_readout` where each state row serves ``G`` consecutive query rows.

    ``q: [R*G, H, T, K]``, ``state.S: [R, H, K, D]`` -> ``[R*G, H, T, D]``. Beam search decodes ``G`` hypotheses
    of one source sentence: they share one source summary, so the cross-attention keeps it once per sentence and
    reads it once for all its hypotheses (one matmul over ``G*T`` query rows) instead of holding, copying and reading
    ``G`` identical copies. Equal to the plain readout on ``state`` repeated ``G`` times along the batch.
    """
    rows, n = state.S.size(0), q.size(0)
    if n == rows:
        return linear_attention_readout(q, state, eps)
    if rows == 0 or n % rows:
        raise ValueError(f"{n} query rows cannot share {rows} state rows (need a whole number of queries per row)")
    _, H, T, K = q.shape
    g = n // rows
    qf = q.float().view(rows, g, H, T, K).transpose(1, 2).reshape(rows, H, g * T, K)
    num = torch.matmul(qf, state.S)
    den = torch.matmul(qf, state.z.unsqueeze(-1)).clamp_min(eps)
    out = (num / den).view(rows, H, g, T, -1).transpose(1, 2).reshape(n, H, T, -1)
    return out.to(q.dtype)


def source_readout_cost(source_len: int, feature_dim: int, value_dim: int) -> Tuple[int, int]:
    """Values read per query and head: ``(summary (S, z), the keys themselves)``.

    The summary is ``K x (D + 1)`` whatever the source length; reading ``phi(k)`` and ``v`` directly is
    ``L x (K + D)``. For a sentence-level source (Multi30k: ~15 tokens, K = 128 features, D = 32..64) the keys are
    the smaller of the two, 2-3x at transformer-base size; beyond ``L = K (D + 1) / (K + D)`` the summary is.
    """
    return feature_dim * (value_dim + 1), source_len * (feature_dim + value_dim)


def keys_linear_attention_readout(q: Tensor, k: Tensor, v: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """:func:`grouped_linear_attention_readout` computed from the keys instead of their summary.

    ``q: [R*G, H, T, K]``, ``k: [R, H, L, K]`` (padded keys already zeroed), ``v: [R, H, L, D]`` ->
    ``[R*G, H, T, D]``: ``out = (phi(q) phi(k)^T) v / max(sum_j phi(q) phi(k_j), eps)``, the same function as the
    summary's readout (``S = phi(k)^T v``, ``z = sum_j phi(k_j)``), associated the other way, so that its cost
    follows the source length (:func:`source_readout_cost`).
    """
    rows, n = k.size(0), q.size(0)
    if rows == 0 or n % rows:
        raise ValueError(f"{n} query rows cannot share {rows} key rows (need a whole number of queries per row)")
    _, H, T, K = q.shape
    g = n // rows
    qf = q.float().view(rows, g, H, T, K).transpose(1, 2).reshape(rows, H, g * T, K)
    scores = torch.matmul(qf, k.float().transpose(-1, -2))
    den = scores.sum(dim=-1, keepdim=True).clamp_min(eps)
    out = (torch.matmul(scores, v.float()) / den).view(rows, H, g, T, -1).transpose(1, 2).reshape(n, H, T, -1)
    return out.to(q.dtype)


def noncausal_linear_attention(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None, eps: float = DEFAULT_EPS
) -> Tensor:
    """Every query attends to every non-padded key; O((T + S) K D) time and memory."""
    return linear_attention_readout(q, linear_attention_state(k, v, key_padding_mask), eps).to(v.dtype)


# ---------------------------------------------------------------------------
# Causal attention: chunkwise parallel form (training) and recurrent step
# (generation). Both accept an initial state and can return the final one, so
# a prompt can be consumed in parallel and generation continued step by step.
# ---------------------------------------------------------------------------


def causal_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    initial_state: Optional[LinearAttentionState] = None,
    output_final_state: bool = False,
    eps: float = DEFAULT_EPS,
    backend: str = "auto",
) -> tuple[Tensor, Optional[LinearAttentionState]]:
    """Causal linear attention in chunkwise-parallel form, O(L) memory.

    ``backend``: ``"torch"`` is the pure-torch computation below (any device);
    ``"fla"`` runs fla's fused Triton kernel (CUDA with the ``fla`` package;
    an error otherwise); ``"auto"`` is the torch path until fla's kernel is
    verified on a GPU (:data:`FLA_VERIFIED`, :func:`_auto_uses_fla`), after which
    it uses fla where chosen and falls back to torch for good (with one warning)
    if the fla call fails. Both compute the same function; ``chunk_size`` applies
    to torch, and sequences shorter than the head count always take the torch path.

    The sequence is cut into ``N = ceil(L / C)`` chunks of ``C = chunk_size``.
    Inside a chunk the contribution is the masked ``C x C`` product
    ``tril(phi(Q) phi(K)^T) V``; across chunks it is ``phi(Q) S_prev`` where
    ``S_prev`` is the exclusive prefix sum of per-chunk ``phi(K)^T V``. Peak
    memory is ``O(L C + (L / C) K D)`` per head -- never ``L x L``. The
    normaliser ``z`` rides along as an extra all-ones column of ``V`` so
    numerator and denominator come out of the same matmuls.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown linear-attention backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "fla" or (backend == "auto" and _auto_uses_fla(q)):
        fused = _try_fla(q, k, v, key_padding_mask, initial_state, output_final_state, eps, required=backend == "fla")
        if fused is not None:
            return fused
    o, final = causal_linear_attention_terms(
        q, k, v, key_padding_mask, chunk_size=chunk_size, initial_state=initial_state,
        output_final_state=output_final_state,
    )
    D = v.size(-1)
    return (o[..., :D] / o[..., D:].clamp_min(eps)).to(v.dtype), final


def causal_linear_attention_terms(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    initial_state: Optional[LinearAttentionState] = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Optional[LinearAttentionState]]:
    """The unnormalised numerator and denominator of :func:`causal_linear_attention` (pure torch).

    Returns ``o: [B, H, L, D + 1]`` in fp32 with ``o[..., :D] = phi(q_i) S_i`` and
    ``o[..., D] = phi(q_i) z_i``, plus the final state if asked. Exposed so that
    attentions which add further terms to the same normaliser (the sliding-window
    hybrid) reuse this chunkwise state carry instead of repeating it.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B, H, L, K = q.shape
    D = v.size(-1)
    qf = q.float()
    kf = _mask_keys(k.float(), key_padding_mask)
    vf = torch.cat([v.float(), v.new_ones((B, H, L, 1), dtype=torch.float32)], dim=-1)  # [B,H,L,D+1]

    C = min(chunk_size, max(L, 1))
    N = -(-L // C)
    pad = N * C - L
    if pad:
        # Trailing zero keys/values/queries: they add nothing to any state and
        # their outputs are dropped below.
        qf = torch.nn.functional.pad(qf, (0, 0, 0, pad))
        kf = torch.nn.functional.pad(kf, (0, 0, 0, pad))
        vf = torch.nn.functional.pad(vf, (0, 0, 0, pad))
    qc = qf.view(B, H, N, C, K)
    kc = kf.view(B, H, N, C, K)
    vc = vf.view(B, H, N, C, D + 1)

    chunk_kv = torch.matmul(kc.transpose(-1, -2), vc)  # [B,H,N,K,D+1]
    inclusive = chunk_kv.cumsum(dim=2)
    prefix = torch.cat([torch.zeros_like(inclusive[:, :, :1]), inclusive[:, :, :-1]], dim=2)
    if initial_state is not None:
        init = torch.cat([initial_state.S.float(), initial_state.z.float().unsqueeze(-1)], dim=-1)
        prefix = prefix + init.unsqueeze(2)

    scores = torch.matmul(qc, kc.transpose(-1, -2))  # [B,H,N,C,C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, 0.0)
    o = torch.matmul(scores, vc) + torch.matmul(qc, prefix)  # [B,H,N,C,D+1]
    o = o.reshape(B, H, N * C, D + 1)[:, :, :L]

    final: Optional[LinearAttentionState] = None
    if output_final_state:
        total = inclusive[:, :, -1]
        if initial_state is not None:
            total = total + init
        final = LinearAttentionState(total[..., :D].contiguous(), total[..., D].contiguous())
    return o, final


def _try_fla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Optional[Tensor],
    initial_state: Optional[LinearAttentionState],
    output_final_state: bool,
    eps: float,
    required: bool,
) -> Optional[tuple[Tensor, Optional[LinearAttentionState]]]:
    """The fla kernel's result, or None where it cannot (or, under "auto", did not) run."""
    global _fla_broken
    from t2r_fairseq.ops import fla_backend

    if not fla_backend.available(q.device):
        if required:
            raise RuntimeError(
                f"linear-attention backend 'fla' needs the fla package and CUDA tensors (got device {q.device}, "
                f"fla {'installed' if fla_backend.installed() else 'not installed'}); install it with "
                "`pip install -e '.[fla]'` on a GPU machine, or use backend 'torch' / 'auto'"
            )
        return None
    if (_fla_broken is not None and not required) or q.size(2) < q.size(1):
        # fla refuses sequences shorter than the head count (it takes them for a layout mistake); such
        # short calls (a few prompt tokens) are cheap in torch anyway.
        return None
    try:
        out, final = fla_backend.fla_causal_linear_attention(
            q, k, v, key_padding_mask, tuple(initial_state) if initial_state is not None else None, output_final_state, eps
        )
    except Exception as err:  # noqa: BLE001 - an fla API or kernel failure must not stop training under "auto"
        if required:
            raise
        _fla_broken = f"{type(err).__name__}: {err}"
        warnings.warn(f"fla linear-attention kernel failed ({_fla_broken}); using the torch path from now on")
        return None
    return out, LinearAttentionState(*final) if final is not None else None


def linear_attention_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: Optional[LinearAttentionState],
    key_padding_mask: Optional[Tensor] = None,
    eps: float = DEFAULT_EPS,
    inplace: bool = False,
) -> tuple[Tensor, LinearAttentionState]:
    """One recurrent step for a single new position.

    ``q, k: [B, H, K]``, ``v: [B, H, D]``, ``key_padding_mask: [B]``. Cost and
    memory are independent of how many steps came before: this is what makes
    the converted transformer an RNN at generation time.

    ``inplace=True`` adds this step into ``state``'s own (contiguous) tensors
    instead of returning new ones: at batch 16 an out-of-place update copies the
    whole ``S`` every step and layer, the largest cost of a step above the
    projections. Only for callers that own the state and need no autograd
    (generation); the returned state is then ``state`` itself.

    The rank-one update is a broadcast ``addcmul`` (one pass over ``S``), not a
    batched matmul with an inner dimension of 1: on CPU the latter ran 2-2.5x
    slower at 128-512 hypotheses (4 heads, 32 x 32 state per head; a 1-thread
    micro-benchmark beside another job, so indicative).
    """
    kf = k.float()
    if key_padding_mask is not None:
        kf = kf.masked_fill(key_padding_mask.view(-1, 1, 1).to(torch.bool), 0.0)
    vf = v.float()
    if state is None:
        # Contiguous from the first step on, so later steps update it in the bmm layout without copies.
        S = (kf.unsqueeze(-1) * vf.unsqueeze(-2)).contiguous()
        z = kf.contiguous()
    elif inplace and state.S.is_contiguous() and state.z.is_contiguous():
        S, z = state.S, state.z
        S.addcmul_(kf.unsqueeze(-1), vf.unsqueeze(-2))
        z.add_(kf)
    else:
        S = torch.addcmul(state.S, kf.unsqueeze(-1), vf.unsqueeze(-2))
        z = state.z + kf
    new_state = LinearAttentionState(S, z)
    out = linear_attention_readout(q.unsqueeze(2), new_state, eps).squeeze(2)
    return out.to(v.dtype), new_state


# ---------------------------------------------------------------------------
# Naive references: test oracles and the source of explicit attention weights.
# ---------------------------------------------------------------------------


def linear_attention_weights(
    q: Tensor,
    k: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    *,
    causal: bool,
    eps: float = DEFAULT_EPS,
) -> Tensor:
    """Explicit normalised weights ``A_ij = phi(q_i).phi(k_j) / max(sum_j ..., eps)``.

    ``[B, H, T, S]``, O(T S) memory. Used for the oracle and for returning
    cross-attention weights (alignments) when fairseq asks for them; for
    ``causal=True`` it assumes query i and key i are the same position.
    """
    kf = _mask_keys(k.float(), key_padding_mask)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2))
    if causal:
        T, S = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T), 0.0)
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(eps)


def naive_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    *,
    causal: bool,
    eps: float = DEFAULT_EPS,
) -> Tensor:
    """O(L^2) reference: materialise the weight matrix, then multiply by V."""
    w = linear_attention_weights(q, k, key_padding_mask, causal=causal, eps=eps)
    return torch.matmul(w, v.float()).to(v.dtype)


def recurrent_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    *,
    initial_state: Optional[LinearAttentionState] = None,
    eps: float = DEFAULT_EPS,
) -> tuple[Tensor, LinearAttentionState]:
    """Reference loop over :func:`linear_attention_step`, the generation-time form."""
    state = initial_state if initial_state is not None else _empty_state(q, v)
    outs = []
    for t in range(q.size(2)):
        step_mask = key_padding_mask[:, t] if key_padding_mask is not None else None
        o, state = linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state, step_mask, eps)
        outs.append(o)
    return torch.stack(outs, dim=2), state
