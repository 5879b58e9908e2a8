"""Hybrid sliding-window attention (LoLCATs-style) as pure tensor functions.

Causal self-attention in which query ``i`` attends to its last ``W`` keys with
softmax-style weights and to every older key with linear-attention weights,
under one shared normaliser::

    a_ij = gamma * exp(q_i.k_j - m_i)    for j in window(i) = (i - W, i]
    a_ij = phi(q_i) . phi(k_j)           for j <= i - W
    out_i = sum_j a_ij v_j / floor_i(sum_j a_ij)

Inputs in the head-first layout of :mod:`t2r_fairseq.ops.linear_attention`:
``q, k: [B, H, L, d]`` (raw; ``q`` already scaled by ``d ** -0.5`` as softmax
attention scales it), ``v: [B, H, L, D]``, ``phi_q: [B, H, L, K]``,
``gamma: [H]`` in (0, 1] (the module passes ``sigmoid`` of a learned per-head
logit), ``key_padding_mask: [B, L]`` True at padding. Keys are mapped by a
``key_map`` callable rather than passed as ``phi(k)``: a key is mapped when it
*leaves* the window, possibly many calls after it was projected (the decode
state keeps raw keys, as a softmax KV cache does, because the window needs them).

Choices, identical in the chunkwise, recurrent and naive forms so that all three
compute one function:

* stabiliser ``m_i`` = max of query ``i``'s window scores over non-padded keys
  (0 when the window holds none). It scales only the window terms, as in
  LoLCATs, so it is part of the function, not a cancelling constant: the window
  is weighed relative to its best key, the linear terms absolutely. It is *not*
  detached: gradients are those of the function computed.
* floor: a query whose window holds no key (``W = 0``, or only padding) is the
  pure linear case and its denominator is floored at ``eps`` exactly like
  :func:`causal_linear_attention`. Otherwise the denominator is already
  ``>= gamma`` (the best window key contributes ``gamma * exp(0)``), no floor
  is needed and none is applied (only the smallest normal float, against a
  ``gamma`` that underflowed to 0). Hence ``W = 0`` is linear attention and
  ``W >= L`` is softmax attention exactly, whatever ``gamma``.
* padded keys contribute to neither part: masked out of the window scores and
  zeroed in feature space for the linear part.

Decode state (:class:`SlidingWindowState`): a ``W``-slot ring buffer of raw
keys and values (slot ``p % W`` holds position ``p``), a validity flag per slot,
the number of positions consumed, and ``(S, z)`` of the keys that have left the
window -- constant in the sequence length. Window attention does not depend on
the order of its keys, so a step overwrites the oldest slot in place, after
adding the key it held to ``(S, z)``.

Numerics follow :mod:`t2r_fairseq.ops.linear_attention`: everything is reduced
in fp32, ``(S, z)`` are fp32, the ring buffer keeps the input dtype (like a KV
cache), outputs are cast back to the input dtype.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from t2r_fairseq.ops.linear_attention import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_EPS,
    LinearAttentionState,
    causal_linear_attention_terms,
)

KeyMap = Callable[[Tensor], Tensor]  # raw keys [B, H, n, d] -> features [B, H, n, K]
_TINY = torch.finfo(torch.float32).tiny


class SlidingWindowState(NamedTuple):
    """Recurrent state of one hybrid layer; every field has the batch first (beam search reorders them all).

    keys:   [B, H, W, d]  raw keys of the window, slot ``p % W`` holds position ``p``
    values: [B, H, W, D]
    valid:  [B, W] bool   False for empty slots and padded keys
    pos:    [B] int64     positions consumed so far (equal across the batch)
    S, z:   [B, H, K, D], [B, H, K] fp32 linear state of the keys that left the window
    """

    keys: Tensor
    values: Tensor
    valid: Tensor
    pos: Tensor
    S: Tensor
    z: Tensor

    @property
    def window(self) -> int:
        return self.keys.size(2)

    def index_select(self, dim: int, index: Tensor) -> "SlidingWindowState":
        return SlidingWindowState(*(t.index_select(dim, index) for t in self))


def empty_sliding_window_state(
    batch: int, heads: int, window: int, head_dim: int, value_dim: int, feature_dim: int, like: Tensor
) -> SlidingWindowState:
    """The state before the first position: no valid slot, ``(S, z) = 0``."""
    return SlidingWindowState(
        keys=like.new_zeros((batch, heads, window, head_dim)),
        values=like.new_zeros((batch, heads, window, value_dim)),
        valid=torch.zeros((batch, window), dtype=torch.bool, device=like.device),
        pos=torch.zeros((batch,), dtype=torch.long, device=like.device),
        S=torch.zeros((batch, heads, feature_dim, value_dim), dtype=torch.float32, device=like.device),
        z=torch.zeros((batch, heads, feature_dim), dtype=torch.float32, device=like.device),
    )


def _check(window: int, state: Optional[SlidingWindowState]) -> None:
    if window < 0:
        raise ValueError(f"sliding window must be >= 0, got {window}")
    if state is not None and state.window != window:
        raise ValueError(f"state holds {state.window} window slots but window={window}")


def _gamma(gamma: Tensor | float, heads: int, device: torch.device) -> Tensor:
    """``gamma`` as an fp32 ``[H]`` tensor (keeps the autograd graph of a parameter)."""
    g = torch.as_tensor(gamma, dtype=torch.float32, device=device)
    return g.float().expand(heads) if g.dim() == 0 else g.float()


def _normalise(num: Tensor, den: Tensor, has_window: Tensor, eps: float) -> Tensor:
    """``num / den`` with the eps floor only where the window held no key (see the module docstring)."""
    floor = torch.where(has_window, _TINY, eps)
    return num / torch.maximum(den, floor.to(den.dtype)).unsqueeze(-1)


def _window_terms(scores: Tensor, allowed: Tensor, values: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Window numerator ``[..., D]``, denominator ``[...]`` and 'window not empty' from fp32 scores ``[..., n]``.

    ``gamma`` must already broadcast against the leading dims (heads in dim 1).
    """
    scores = scores.masked_fill(~allowed, float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)
    has_window = m > float("-inf")
    e = torch.exp(scores - torch.where(has_window, m, torch.zeros_like(m)))  # masked keys: exp(-inf) = 0
    num = torch.matmul(e, values) * gamma.unsqueeze(-1)
    den = e.sum(dim=-1) * gamma
    return num, den, has_window.squeeze(-1)


# ---------------------------------------------------------------------------
# Chunkwise-parallel form (training, prompt prefill).
# ---------------------------------------------------------------------------


def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    phi_q: Tensor,
    gamma: Tensor | float,
    key_map: KeyMap,
    window: int,
    key_padding_mask: Optional[Tensor] = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    initial_state: Optional[SlidingWindowState] = None,
    output_final_state: bool = False,
    eps: float = DEFAULT_EPS,
) -> tuple[Tensor, Optional[SlidingWindowState]]:
    """The hybrid over a whole sequence (continuing ``initial_state`` if given), O(L (W + C)) memory.

    Keys are laid out as ``ext = [the W keys of the state's window (oldest first), k]``
    (``W`` empty slots without a state), so new query ``i`` sees window keys
    ``ext[i+1 .. i+W]`` and linear keys ``ext[.. i]``:

    * window part: queries in chunks of ``C``; each chunk scores against the
      ``C + W - 1`` keys that any of its queries can see (an overlapping
      ``unfold`` view), banded so query ``r`` keeps columns ``r .. r + W - 1``;
    * linear part: :func:`causal_linear_attention_terms` of ``phi(q)`` against
      ``phi(ext[:L])`` -- the keys shifted by ``W``, i.e. exactly the keys that
      have left each query's window -- carrying ``(S, z)`` chunk to chunk.

    Both unnormalised parts are summed, then normalised once.
    """
    _check(window, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B, H, L, d = q.shape
    D, W = v.size(-1), window
    device = q.device
    new_valid = (
        ~key_padding_mask.to(torch.bool) if key_padding_mask is not None else torch.ones(B, L, dtype=torch.bool, device=device)
    )
    if initial_state is None:
        state = empty_sliding_window_state(B, H, W, d, D, phi_q.size(-1), k)
        linear_init: Optional[LinearAttentionState] = None
    else:
        state = initial_state
        linear_init = LinearAttentionState(state.S, state.z)
    start = state.pos[:1]  # positions consumed before this call
    oldest_first = (start + torch.arange(W, device=device)) % W if W else start[:0]
    ext_k = torch.cat([state.keys.index_select(2, oldest_first).to(k.dtype), k], dim=2)  # [B,H,W+L,d]
    ext_v = torch.cat([state.values.index_select(2, oldest_first).to(v.dtype), v], dim=2)
    ext_valid = torch.cat([state.valid.index_select(1, oldest_first), new_valid], dim=1)  # [B,W+L]

    # Linear part over the keys that have left the window.
    o, linear_final = causal_linear_attention_terms(
        phi_q, key_map(ext_k[:, :, :L]), ext_v[:, :, :L], ~ext_valid[:, :L],
        chunk_size=chunk_size, initial_state=linear_init, output_final_state=output_final_state,
    )
    num, den = o[..., :D], o[..., D]

    if W:
        C = min(chunk_size, max(L, 1))
        N = -(-L // C)
        span = C + W - 1
        tail = N * C - L  # pad so the last chunk has its full span
        qf = torch.nn.functional.pad(q.float(), (0, 0, 0, tail)).view(B, H, N, C, d)
        kb = torch.nn.functional.pad(ext_k[:, :, 1:].float(), (0, 0, 0, tail)).unfold(2, span, C)  # [B,H,N,d,span]
        vb = torch.nn.functional.pad(ext_v[:, :, 1:].float(), (0, 0, 0, tail)).unfold(2, span, C)  # [B,H,N,D,span]
        valid_b = torch.nn.functional.pad(ext_valid[:, 1:], (0, tail)).unfold(1, span, C)  # [B,N,span]
        col = torch.arange(span, device=device)
        row = torch.arange(C, device=device)
        band = (col[None, :] >= row[:, None]) & (col[None, :] < row[:, None] + W)  # [C, span]
        allowed = band & valid_b[:, None, :, None, :]  # [B,1,N,C,span]
        g = _gamma(gamma, H, device).view(1, H, 1, 1)
        w_num, w_den, has_window = _window_terms(torch.matmul(qf, kb), allowed, vb.transpose(-1, -2), g)
        num = num + w_num.reshape(B, H, N * C, D)[:, :, :L]
        den = den + w_den.reshape(B, H, N * C)[:, :, :L]
        has_window = has_window.reshape(B, H, N * C)[:, :, :L]
    else:
        has_window = torch.zeros_like(den, dtype=torch.bool)
    out = _normalise(num, den, has_window, eps).to(v.dtype)

    final: Optional[SlidingWindowState] = None
    if output_final_state:
        assert linear_final is not None
        # The last W positions, written back so that position p sits in slot p % W.
        end = start + L
        slot_to_ordered = (torch.arange(W, device=device) - end) % W if W else start[:0]
        final = SlidingWindowState(
            keys=ext_k[:, :, L:].index_select(2, slot_to_ordered).to(state.keys.dtype),
            values=ext_v[:, :, L:].index_select(2, slot_to_ordered).to(state.values.dtype),
            valid=ext_valid[:, L:].index_select(1, slot_to_ordered),
            pos=state.pos + L,
            S=linear_final.S,
            z=linear_final.z,
        )
    return out, final


# ---------------------------------------------------------------------------
# Recurrent form (generation): one position, constant cost and memory.
# ---------------------------------------------------------------------------


def sliding_window_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    phi_q: Tensor,
    gamma: Tensor | float,
    key_map: KeyMap,
    window: int,
    state: Optional[SlidingWindowState],
    key_padding_mask: Optional[Tensor] = None,
    eps: float = DEFAULT_EPS,
    inplace: bool = False,
) -> tuple[Tensor, SlidingWindowState]:
    """One new position: ``q, k: [B, H, d]``, ``v: [B, H, D]``, ``phi_q: [B, H, K]``, ``key_padding_mask: [B]``.

    The slot about to be overwritten holds the key that leaves the window now
    (position ``t - W``); it is mapped and added to ``(S, z)``, the new key takes
    its slot, then the query reads the window and the linear state. Cost is
    O(W d + K D) per head whatever the prefix length. ``inplace=True``
    (generation only: the caller owns the state and needs no autograd) updates
    the state's tensors where they are, like :func:`linear_attention_step`.
    """
    _check(window, state)
    B, H, d = q.shape
    D, W = v.size(-1), window
    if state is None:
        state = empty_sliding_window_state(B, H, W, d, D, phi_q.size(-1), k)
        inplace = False  # fresh tensors: nothing to save, but keep one code path
    inplace = inplace and all(t.is_contiguous() for t in state)
    new_valid = (
        ~key_padding_mask.to(torch.bool).view(B) if key_padding_mask is not None
        else torch.ones(B, dtype=torch.bool, device=q.device)
    )
    if W:
        slot = state.pos[:1] % W
        old_valid = state.valid.index_select(1, slot)  # [B,1]
        leaving = key_map(state.keys.index_select(2, slot)).float()  # [B,H,1,K]
        phi_old = leaving.masked_fill(~old_valid[:, None, :, None], 0.0)[:, :, 0]
        v_old = state.values.index_select(2, slot)[:, :, 0].float()
    else:  # no window: the new key goes straight into the linear state
        phi_old = key_map(k.unsqueeze(2)).float()[:, :, 0].masked_fill(~new_valid[:, None, None], 0.0)
        v_old = v.float()

    if inplace:
        S, z = state.S, state.z
        S.addcmul_(phi_old.unsqueeze(-1), v_old.unsqueeze(-2))  # the rank-one update as linear_attention's step
        z.add_(phi_old)
        keys, values, valid, pos = state.keys, state.values, state.valid, state.pos
        if W:
            keys.index_copy_(2, slot, k.unsqueeze(2).to(keys.dtype))
            values.index_copy_(2, slot, v.unsqueeze(2).to(values.dtype))
            valid.index_copy_(1, slot, new_valid.unsqueeze(1))
        pos.add_(1)
    else:
        S = torch.addcmul(state.S, phi_old.unsqueeze(-1), v_old.unsqueeze(-2))
        z = state.z + phi_old
        keys, values, valid = state.keys, state.values, state.valid
        if W:
            keys = keys.index_copy(2, slot, k.unsqueeze(2).to(keys.dtype))
            values = values.index_copy(2, slot, v.unsqueeze(2).to(values.dtype))
            valid = valid.index_copy(1, slot, new_valid.unsqueeze(1))
        pos = state.pos + 1
    new_state = SlidingWindowState(keys, values, valid, pos, S, z)

    qf = phi_q.float().unsqueeze(2)  # [B,H,1,K]
    num = torch.matmul(qf, S)[:, :, 0]  # [B,H,D]
    den = torch.matmul(qf, z.unsqueeze(-1))[:, :, 0, 0]  # [B,H]
    if W:
        scores = torch.matmul(q.float().unsqueeze(2), keys.float().transpose(-1, -2))  # [B,H,1,W]
        g = _gamma(gamma, H, q.device).view(1, H, 1)
        w_num, w_den, has_window = _window_terms(scores, valid[:, None, None, :], values.float(), g)
        num = num + w_num[:, :, 0]
        den = den + w_den[:, :, 0]
        has_window = has_window[:, :, 0]
    else:
        has_window = torch.zeros_like(den, dtype=torch.bool)
    return _normalise(num, den, has_window, eps).to(v.dtype), new_state


def recurrent_sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    phi_q: Tensor,
    gamma: Tensor | float,
    key_map: KeyMap,
    window: int,
    key_padding_mask: Optional[Tensor] = None,
    *,
    initial_state: Optional[SlidingWindowState] = None,
    eps: float = DEFAULT_EPS,
) -> tuple[Tensor, SlidingWindowState]:
    """Reference loop over :func:`sliding_window_step`, the generation-time form (tests, documentation)."""
    state = initial_state
    outs = []
    for t in range(q.size(2)):
        step_mask = key_padding_mask[:, t] if key_padding_mask is not None else None
        o, state = sliding_window_step(
            q[:, :, t], k[:, :, t], v[:, :, t], phi_q[:, :, t], gamma, key_map, window, state, step_mask, eps
        )
        outs.append(o)
    assert state is not None or q.size(2) == 0
    return torch.stack(outs, dim=2), state  # type: ignore[return-value]


# ---------------------------------------------------------------------------
# Naive O(L^2) reference: the test oracle.
# ---------------------------------------------------------------------------


def sliding_window_weights(
    q: Tensor,
    k: Tensor,
    phi_q: Tensor,
    gamma: Tensor | float,
    key_map: KeyMap,
    window: int,
    key_padding_mask: Optional[Tensor] = None,
    *,
    eps: float = DEFAULT_EPS,
) -> Tensor:
    """Explicit normalised weights ``[B, H, L, L]`` of the hybrid, straight from the definition."""
    _check(window, None)
    B, H, L, _ = q.shape
    pos = torch.arange(L, device=q.device)
    i, j = pos[:, None], pos[None, :]
    in_window = (j <= i) & (j > i - window)
    older = j <= i - window
    valid = (
        ~key_padding_mask.to(torch.bool)[:, None, None, :] if key_padding_mask is not None
        else torch.ones(1, 1, 1, L, dtype=torch.bool, device=q.device)
    )
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).masked_fill(~(in_window & valid), float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)
    has_window = m > float("-inf")
    g = _gamma(gamma, H, q.device).view(1, H, 1, 1)
    a_window = g * torch.exp(scores - torch.where(has_window, m, torch.zeros_like(m)))
    a_linear = torch.matmul(phi_q.float(), key_map(k).float().transpose(-1, -2)) * (older & valid)
    a = a_window + a_linear
    floor = torch.where(has_window, torch.full_like(m, _TINY), torch.full_like(m, eps))
    return a / torch.maximum(a.sum(dim=-1, keepdim=True), floor)


def naive_sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    phi_q: Tensor,
    gamma: Tensor | float,
    key_map: KeyMap,
    window: int,
    key_padding_mask: Optional[Tensor] = None,
    *,
    eps: float = DEFAULT_EPS,
) -> Tensor:
    """O(L^2) reference: materialise the hybrid's weight matrix, then multiply by V."""
    w = sliding_window_weights(q, k, phi_q, gamma, key_map, window, key_padding_mask, eps=eps)
    return torch.matmul(w, v.float()).to(v.dtype)
