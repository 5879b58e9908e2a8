"""The cross-attention's cached source: built once per source sentence, read at every step of generation.

Linear cross-attention reads a source that does not change while a sentence is decoded, so the source is encoded
at the first step and only read afterwards. These functions are that cache's life, apart from the attention module
that projects into it (:class:`~t2r_fairseq.modules.linear_multihead_attention.LinearMultiheadAttention`):

* :func:`sentence_rows` -- fairseq's generator repeats each sentence's encoder output for its beam; one copy per
  sentence is enough, since every hypothesis of a sentence has the same source;
* :func:`encode_source` -- the cache itself: the summary ``(S, z)`` (``K x (D + 1)`` per head, constant in the
  source length ``L``) or ``phi(k)`` and ``v`` (``L x (K + D)``), whichever is cheaper to read at every step
  (:func:`~t2r_fairseq.ops.linear_attention.source_readout_cost`); both give the same output;
* :func:`read_source` -- one step's output, each sentence's cache read once for all its hypotheses;
* :func:`source_rows_after_reorder` -- what a beam reorder does to it: nothing while the batch keeps its
  sentences (hypotheses move only within their sentence), one row per remaining sentence when some finish.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from t2r_fairseq.ops.linear_attention import (
    LinearAttentionState,
    grouped_linear_attention_readout,
    keys_linear_attention_readout,
    linear_attention_state,
    masked_keys,
    source_readout_cost,
)

SourceCache = Dict[str, Optional[Tensor]]


def hypotheses_per_row(buffer: SourceCache) -> int:
    """Hypotheses each row of a layer's cached state serves: the beam when a source state is kept once per
    sentence (its ``group`` entry, ``[sentences, beam]``), else 1."""
    group = buffer.get("group")
    return group.size(1) if group is not None else 1


def sentence_rows(key: Tensor, key_padding_mask: Optional[Tensor], beam: int) -> Tuple[Tensor, Optional[Tensor], int]:
    """The encoder output once per source sentence: ``(key, mask, hypotheses per row)``.

    ``key`` is ``[L, rows, C]`` as fairseq passes it, ``rows`` = sentences x ``beam`` when the generator repeated
    each sentence for its hypotheses. The repeat is checked (one comparison over the encoder output, once per
    batch), so a stale beam size -- a greedy call after a beam search on the same model -- falls back to one row
    per hypothesis instead of mixing sentences.
    """
    rows = key.size(1)
    if beam <= 1 or rows % beam:
        return key, key_padding_mask, 1
    grouped = key.reshape(key.size(0), rows // beam, beam, -1)
    first = grouped[:, :, :1]
    if not torch.equal(grouped, first.expand_as(grouped)):
        return key, key_padding_mask, 1
    mask = None
    if key_padding_mask is not None:
        masks = key_padding_mask.reshape(rows // beam, beam, -1)
        if not torch.equal(masks, masks[:, :1].expand_as(masks)):
            return key, key_padding_mask, 1
        mask = masks[:, 0]
    return first.squeeze(2), mask, beam


def encode_source(
    phi_k: Tensor, v: Tensor, source_mask: Optional[Tensor], group: int = 1, keys_allowed: bool = True,
    keep_keys: bool = False,
) -> SourceCache:
    """The cache of one source: ``{phi_k, v}`` where ``keys_allowed`` and reading them costs less than the summary,
    else ``{S, z}`` (plus ``phi_k`` when ``keep_keys``: alignments asked for, so the source is mapped once); and
    ``group`` (``[rows, group]``, no data) when each row serves ``group`` hypotheses.

    ``phi_k: [rows, H, L, K]``, ``v: [rows, H, L, D]``, ``source_mask: [rows, L]`` (True = padding) or None.
    """
    summary_cost, keys_cost = source_readout_cost(phi_k.size(2), phi_k.size(-1), v.size(-1))
    cache: SourceCache
    if keys_allowed and keys_cost < summary_cost:
        cache = {"phi_k": masked_keys(phi_k, source_mask), "v": v.float()}
    else:
        state = linear_attention_state(phi_k, v, source_mask)
        cache = {"S": state.S, "z": state.z}
        if keep_keys:
            cache["phi_k"] = masked_keys(phi_k, source_mask)
    if group > 1:
        cache["group"] = phi_k.new_empty((phi_k.size(0), group), dtype=torch.bool)
    return cache


def read_source(phi_q: Tensor, cache: SourceCache, eps: float) -> Tensor:
    """``[rows x group, H, T, D]``: the queries' readout of the cached source, each cache row read once for the
    ``group`` consecutive query rows it serves."""
    if "S" in cache:
        return grouped_linear_attention_readout(phi_q, LinearAttentionState(cache["S"], cache["z"]), eps)
    return keys_linear_attention_readout(phi_q, cache["phi_k"], cache["v"], eps)


def source_rows_after_reorder(cache: SourceCache, new_order: Tensor) -> Optional[Tensor]:
    """For a cache kept once per sentence: None when the reorder leaves it as it is (the batch keeps its
    sentences), else the cache rows to keep (one per remaining sentence). Raises when ``new_order`` cannot be read
    as whole beams."""
    group = hypotheses_per_row(cache)
    if cache["group"].size(0) * group == new_order.numel():
        return None
    if new_order.numel() % group:
        raise ValueError(
            f"cannot reorder a source state kept once per sentence for {group} hypotheses each into "
            f"{new_order.numel()} rows: the generator must keep its beam size (set_beam_size)"
        )
    return new_order.view(-1, group)[:, 0] // group
