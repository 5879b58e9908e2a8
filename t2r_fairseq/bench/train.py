"""Training benchmark: forward + backward of one attention layer's core vs sequence length.

Variants, on the same ``q, k, v: [B, H, L, d]``:

* ``chunkwise``: :func:`causal_linear_attention` (pure torch, chunk ``C``)
  including the T2R feature map on q and k — what a T2R layer runs in training;
* ``sdpa_softmax``: ``torch.nn.functional.scaled_dot_product_attention`` with
  ``is_causal=True`` (the fused softmax kernel torch picks for the device);
* ``naive_quadratic``: the O(L^2) linear form (the original T2R code's), skipped
  above ``--naive-max-length``;
* ``hybrid_wW`` (with ``--sliding-window W``): the sliding-window hybrid
  (:func:`sliding_window_attention`, same feature map and chunk), O(L (W + C));
* ``fla_chunk``: the same computation through fla's Triton kernel, only when
  the ``fla`` package and a CUDA device are present (see
  :mod:`t2r_fairseq.ops.fla_backend`).

With ``--topk-k k`` (default 32; 0 skips it) also ``topk_k<k>``: chunked top-k
softmax attention (Gupta et al. 2021, :func:`t2r_fairseq.topk.ops.topk_attention`),
``--topk-query-chunk`` queries at a time.

Memory: on the CPU, the bytes autograd saves for backward (what grows with L in
training); on CUDA, also the allocator's peak.
"""

from __future__ import annotations

import argparse
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from t2r_fairseq.bench.measure import peak_memory_mib, reset_peak_memory, timeit


def saved_activation_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward during ``fn()``."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def _variants(cfg: argparse.Namespace, fmap: torch.nn.Module, device: torch.device) -> Dict[str, Callable]:
    from t2r_fairseq.ops import fla_backend
    from t2r_fairseq.ops.linear_attention import causal_linear_attention, naive_linear_attention
    from t2r_fairseq.ops.sliding_window import sliding_window_attention

    def chunkwise(q, k, v, chunk: int = cfg.chunk_size):  # noqa: ANN001,ANN202
        return causal_linear_attention(fmap(q, True), fmap(k, False), v, chunk_size=chunk, backend="torch")[0]

    variants: Dict[str, Callable] = {
        "chunkwise": chunkwise,
        "sdpa_softmax": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "naive_quadratic": lambda q, k, v: naive_linear_attention(fmap(q, True), fmap(k, False), v, causal=True),
    }
    window = getattr(cfg, "sliding_window", 0)
    if window:
        gamma = torch.full((cfg.train_heads,), 0.12, device=device, requires_grad=True)
        variants[f"hybrid_w{window}"] = lambda q, k, v: sliding_window_attention(
            q, k, v, fmap(q, True), gamma, lambda x: fmap(x, False), window, chunk_size=cfg.chunk_size)[0]
    if fla_backend.available(device):
        variants["fla_chunk"] = lambda q, k, v: causal_linear_attention(
            fmap(q, True), fmap(k, False), v, backend="fla")[0]
    if getattr(cfg, "topk_k", 0):  # top-k attention: keep cfg.topk_k keys per query, query chunks of topk_query_chunk
        from t2r_fairseq.topk.ops import topk_attention

        variants[f"topk_k{cfg.topk_k}"] = lambda q, k, v: topk_attention(
            q * q.size(-1) ** -0.5, k, v, cfg.topk_k, causal=True, query_chunk=cfg.topk_query_chunk)[0]
    return variants


def bench_training(cfg: argparse.Namespace) -> List[dict]:
    """One row per (variant, L), then the chunk-size sweep at the longest L."""
    from t2r_fairseq.modules.feature_maps import build_feature_map

    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    B, H, d = cfg.train_batch, cfg.train_heads, cfg.train_head_dim
    fmap = build_feature_map("t2r", H, d, cfg.feature_size).to(device, dtype)
    variants = _variants(cfg, fmap, device)

    def inputs(L: int):  # noqa: ANN202
        return [torch.randn(B, H, L, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]

    def measure(name: str, L: int, fn: Callable, **extra: object) -> dict:
        q, k, v = inputs(L)
        reset_peak_memory(device)
        t = timeit(lambda: fn(q, k, v).float().sum().backward(), cfg.warmup, cfg.repeats, device)
        row = {"variant": name, "length": L, **extra, **t,
               "saved_activation_bytes": saved_activation_bytes(lambda: fn(q, k, v)),
               "peak_mem_mib": peak_memory_mib(device)}
        print(f"train {name:>16} L {L:>5}: {t['median_ms']:9.2f} ms fwd+bwd (spread {t['spread_ms']:.2f}), saved "
              f"activations {row['saved_activation_bytes'] / 2**20:8.1f} MiB", flush=True)
        return row

    rows = []
    for L in cfg.train_lengths:
        for name, fn in variants.items():
            if name == "naive_quadratic" and L > cfg.naive_max_length:
                continue
            rows.append(measure(name, L, fn))
    L = max(cfg.train_lengths)
    for chunk in cfg.chunk_sweep:
        rows.append(measure(f"chunkwise_c{chunk}", L, lambda q, k, v, c=chunk: variants["chunkwise"](q, k, v, c),
                            chunk=chunk))
    return rows
