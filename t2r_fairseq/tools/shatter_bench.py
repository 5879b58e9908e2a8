"""Forward+backward time and memory of one encoder layer: fairseq's multi-head attention vs Shatter.

``python -m t2r_fairseq.tools.shatter_bench --lengths 128,256,512,1024 --dim 128 --heads 4 --batch 8``

Each row builds fairseq's ``TransformerEncoderLayerBase`` (multi-head softmax) and
:class:`~t2r_fairseq.shatter.layers.ShatterEncoderLayer` of the same width and FFN, in training mode
(dropout as given), and reports per length: the median and minimum fwd+bwd time of a training step on random
inputs with padding-free batches, the two variants' steps interleaved (A B A B ...) so that both see the same
background load, the bytes autograd saves for backward (deterministic; the memory the claim is about), and
the process's peak RSS (CPU) / allocator peak (CUDA) for the step. Writes JSON rows with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Dict, List

import torch

from t2r_fairseq.bench.measure import peak_memory_mib, reset_peak_memory, timeit
from t2r_fairseq.bench.train import saved_activation_bytes


def _layers(dim: int, heads: int, ffn: int, dropout: float, partitions: int, score: str):
    from fairseq.models.transformer import TransformerConfig
    from fairseq.modules.transformer_layer import TransformerEncoderLayerBase

    from t2r_fairseq.shatter.layers import ShatterEncoderLayer
    from t2r_fairseq.shatter.attention import ShatterOptions

    cfg = TransformerConfig()
    cfg.encoder.embed_dim, cfg.encoder.ffn_embed_dim, cfg.encoder.attention_heads = dim, ffn, heads
    cfg.dropout = cfg.attention_dropout = dropout
    return {
        f"multihead_h{heads}": TransformerEncoderLayerBase(cfg),
        f"shatter_p{partitions}": ShatterEncoderLayer(cfg, ShatterOptions(partitions=partitions, score=score)),
    }


def main(argv: List[str] | None = None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="128,256,512,1024")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=0, help="FFN width (default 4 x dim)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--partitions", type=int, default=3)
    p.add_argument("--score", default="sigmoid")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    torch.manual_seed(a.seed)
    layers = _layers(a.dim, a.heads, a.ffn or 4 * a.dim, a.dropout, a.partitions, a.score)
    rows = []
    for length in (int(x) for x in a.lengths.split(",")):
        x = torch.randn(length, a.batch, a.dim, device=device)

        def step(layer: torch.nn.Module) -> None:
            out = layer(x.requires_grad_(), None)
            out = out[0] if isinstance(out, tuple) else out
            out.float().square().mean().backward()

        for layer in layers.values():
            layer.to(device).train()
            for _ in range(a.warmup):
                step(layer)
        # Interleaved (A B A B ...): on a shared machine both variants then see the same background load.
        times: Dict[str, List[float]] = {name: [] for name in layers}
        for _ in range(a.repeats):
            for name, layer in layers.items():
                times[name].append(timeit(lambda: step(layer), 0, 1, device)["median_ms"])
        for name, layer in layers.items():
            reset_peak_memory(device)
            step(layer)
            peak = peak_memory_mib(device)
            saved = saved_activation_bytes(lambda: layer(x.requires_grad_(), None))
            t = {"median_ms": statistics.median(times[name]), "min_ms": min(times[name]),
                 "spread_ms": max(times[name]) - min(times[name])}
            row = {"variant": name, "length": length, "batch": a.batch, "dim": a.dim,
                   "params": sum(q.numel() for q in layer.parameters()), **t,
                   "saved_activation_mib": saved / 2**20, "peak_mib": peak}
            rows.append(row)
            print(f"{name:>14} L {length:>5}: {t['median_ms']:9.1f} ms fwd+bwd (min {t['min_ms']:.1f}, spread "
                  f"{t['spread_ms']:.1f}), saved {row['saved_activation_mib']:8.1f} MiB, peak {peak:8.1f} MiB, "
                  f"params {row['params']}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"argv": sys.argv, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
