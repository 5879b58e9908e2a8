"""Benchmarks: decode speed and state size vs context, training throughput vs sequence length.

    python -m t2r_fairseq.bench [--out bench-out] [--contexts 64,256,1024,4096] [--batches 1,16]
                                [--train-lengths 512,1024,2048,4096] [--threads 2] [--tiny]

Everything is measured in one run so that ratios are comparable (same machine,
same load, same threads); each figure is the median of ``--repeats`` timed
repetitions after ``--warmup`` untimed ones, with the spread (max - min) beside it.

1. decode: one incremental step of fairseq's softmax ``transformer_lm`` (KV cache)
   vs the T2R model of the same size (``(S, z)`` state) vs an attention-free
   lower bound (the same model with the attention's token mixing removed but its
   q/k/v/out projections kept), at each
   context length. The state is pre-filled to the context length so a step at
   context 8192 costs one step, not 8192 of them; fairseq's own decoder computes
   the step (embedding, positions, layers, output projection).
2. decode memory: bytes of the incremental state at each context, and the
   process's peak resident memory.
3. training: forward+backward of one attention layer's core (feature map +
   attention) vs sequence length, for chunkwise linear attention, torch SDPA
   (causal softmax) and the naive quadratic linear form, plus a chunk-size sweep.

Output: ``results.md``, ``results.json`` and PNG plots in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------- timing


def timeit(fn: Callable[[], object], warmup: int, repeats: int) -> Dict[str, float]:
    """Median and spread in milliseconds of ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return {"median_ms": statistics.median(times), "spread_ms": max(times) - min(times)}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- decode


class _MixingFreeAttention(nn.Module):
    """The attention block with its token mixing removed: the attention-free lower bound.

    It keeps the layer's q/k/v/out projections (they are the model's parameters
    and any attention variant pays for them) but lets each position see only its
    own value, ``out_proj(v_proj(x))``, with no state at all. What T2R costs above
    this is the price of its feature maps and recurrent state; what softmax costs
    above it is the price of its KV cache.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj

    def forward(self, query, key=None, value=None, **kwargs):  # noqa: ANN001 - fairseq's call signature
        self.q_proj(query)
        self.k_proj(query)
        return self.out_proj(self.v_proj(query)), None

    def _get_input_buffer(self, incremental_state):  # noqa: ANN001
        return {}

    def _set_input_buffer(self, incremental_state, buffer):  # noqa: ANN001
        return incremental_state


def build_lm(kind: str, layers: int, dim: int, heads: int, vocab: int, max_positions: int, feature_size: int):
    """A fairseq LM with random weights: ``softmax`` (transformer_lm), ``t2r`` or ``no_attention``."""
    from fairseq import options, tasks
    from fairseq.data import Dictionary

    import t2r_fairseq  # noqa: F401  (registers the T2R models)

    dictionary = Dictionary()
    for i in range(vocab - len(dictionary)):
        dictionary.add_symbol(f"w{i}")
    arch = "t2r_transformer_lm" if kind == "t2r" else "transformer_lm"
    parser = options.get_training_parser()
    argv = ["/nonexistent", "--task", "language_modeling", "--arch", arch, "--decoder-layers", str(layers),
            "--decoder-embed-dim", str(dim), "--decoder-input-dim", str(dim), "--decoder-output-dim", str(dim),
            "--decoder-ffn-embed-dim", str(4 * dim), "--decoder-attention-heads", str(heads),
            "--tokens-per-sample", str(max_positions), "--max-target-positions", str(max_positions),
            "--share-decoder-input-output-embed", "--cpu"]
    if kind == "t2r":
        argv += ["--feature-size", str(feature_size)]
    args = options.parse_args_and_arch(parser, argv)
    task = tasks.language_modeling.LanguageModelingTask(args, dictionary, dictionary)
    model = task.build_model(args).eval()
    if kind == "no_attention":
        for layer in model.decoder.layers:
            layer.self_attn = _MixingFreeAttention(layer.self_attn)
    model.make_generation_fast_()
    return model


def prefill_state(model, kind: str, batch: int, context: int) -> dict:
    """An incremental state as if ``context`` tokens had been decoded (random contents)."""
    state: dict = {}
    if kind == "no_attention":
        return state
    for layer in model.decoder.layers:
        attn = layer.self_attn
        H, d = attn.num_heads, attn.head_dim
        if kind == "softmax":
            buffer = {"prev_key": torch.randn(batch, H, context, d), "prev_value": torch.randn(batch, H, context, d),
                      "prev_key_padding_mask": None}
        else:
            K = attn.feature_map.output_dim
            buffer = {"S": torch.rand(batch, H, K, d), "z": torch.rand(batch, H, K) + 1.0}
        attn._set_input_buffer(state, buffer)
    return state


def state_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for buf in state.values() for t in buf.values() if t is not None)


@torch.no_grad()
def bench_decode(cfg: argparse.Namespace) -> List[dict]:
    rows = []
    max_ctx = max(cfg.contexts) + 8
    models = {kind: build_lm(kind, cfg.layers, cfg.dim, cfg.heads, cfg.vocab, max_ctx, cfg.feature_size)
              for kind in ("softmax", "t2r", "no_attention")}
    # Model-major order, softmax last: its multi-GB KV caches at long contexts
    # disturb the allocator and caches for whatever is timed right after them.
    for kind in ("no_attention", "t2r", "softmax"):
        model = models[kind]
        for batch, context in ((b, c) for b in cfg.batches for c in cfg.contexts):
            tokens = torch.randint(4, cfg.vocab, (batch, context + 1))
            base = prefill_state(model, kind, batch, context)

            def step() -> None:
                # A fresh shallow copy per call: the step must not grow the
                # cache that the next repetition measures.
                state = {k: dict(v) for k, v in base.items()}
                model.decoder(tokens, incremental_state=state)

            t = timeit(step, cfg.warmup, cfg.repeats)
            row = {"model": kind, "batch": batch, "context": context, **t,
                   "tokens_per_s": batch * 1000 / t["median_ms"], "state_bytes": state_bytes(base)}
            rows.append(row)
            print(f"decode {kind:>12} batch {batch:>3} context {context:>5}: {t['median_ms']:7.2f} ms/step "
                  f"(spread {t['spread_ms']:.2f}), state {row['state_bytes'] / 2**20:8.2f} MiB", flush=True)
    return rows


# --------------------------------------------------------------------------- training


def bench_training(cfg: argparse.Namespace) -> List[dict]:
    from t2r_fairseq.modules.feature_maps import build_feature_map
    from t2r_fairseq.ops.linear_attention import causal_linear_attention, naive_linear_attention

    B, H, d = cfg.train_batch, cfg.train_heads, cfg.train_head_dim
    fmap = build_feature_map("t2r", H, d, cfg.feature_size)

    def linear(q, k, v, chunk: int):
        out, _ = causal_linear_attention(fmap(q, True), fmap(k, False), v, chunk_size=chunk)
        return out

    variants: Dict[str, Callable] = {
        "chunkwise": lambda q, k, v: linear(q, k, v, cfg.chunk_size),
        "sdpa_softmax": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "naive_quadratic": lambda q, k, v: naive_linear_attention(fmap(q, True), fmap(k, False), v, causal=True),
    }
    rows = []
    for L in cfg.train_lengths:
        q, k, v = (torch.randn(B, H, L, d, requires_grad=True) for _ in range(3))
        for name, fn in variants.items():
            if name == "naive_quadratic" and L > cfg.naive_max_length:
                continue

            def fwd_bwd() -> None:
                fn(q, k, v).sum().backward()

            t = timeit(fwd_bwd, cfg.warmup, cfg.repeats)
            mem = _peak_saved_bytes(lambda: fn(q, k, v))
            rows.append({"variant": name, "length": L, **t, "saved_activation_bytes": mem})
            print(f"train {name:>16} L {L:>5}: {t['median_ms']:8.2f} ms fwd+bwd, saved activations "
                  f"{mem / 2**20:8.1f} MiB", flush=True)
    for chunk in cfg.chunk_sweep:
        L = max(cfg.train_lengths)
        q, k, v = (torch.randn(B, H, L, d, requires_grad=True) for _ in range(3))
        t = timeit(lambda: linear(q, k, v, chunk).sum().backward(), cfg.warmup, cfg.repeats)
        rows.append({"variant": f"chunkwise_c{chunk}", "length": L, "chunk": chunk, **t,
                     "saved_activation_bytes": _peak_saved_bytes(lambda: linear(q, k, v, chunk))})
        print(f"train chunk sweep c={chunk:>4} L {L}: {t['median_ms']:8.2f} ms", flush=True)
    return rows


def _peak_saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of tensors autograd saves for backward: the training-memory figure that scales with L."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


# --------------------------------------------------------------------------- report


def summarise(decode: List[dict], train: List[dict], cfg: argparse.Namespace) -> Dict[str, object]:
    """The ratios the targets are stated in, computed from this run's figures."""

    def dec(model: str, batch: int, context: int) -> dict:
        return next(r for r in decode if r["model"] == model and r["batch"] == batch and r["context"] == context)

    out: Dict[str, object] = {}
    lo, hi = min(cfg.contexts), max(cfg.contexts)
    for b in cfg.batches:
        t2r_lo, t2r_hi = dec("t2r", b, lo), dec("t2r", b, hi)
        sm_hi = dec("softmax", b, hi)
        out[f"b{b}_t2r_step_ratio_ctx{hi}_vs_ctx{lo}"] = t2r_hi["median_ms"] / t2r_lo["median_ms"]
        out[f"b{b}_t2r_speedup_vs_softmax_ctx{hi}"] = sm_hi["median_ms"] / t2r_hi["median_ms"]
        out[f"b{b}_t2r_over_attention_free_ctx{hi}"] = t2r_hi["median_ms"] / dec("no_attention", b, hi)["median_ms"]
        out[f"b{b}_kv_cache_over_t2r_state_ctx{hi}"] = sm_hi["state_bytes"] / max(t2r_hi["state_bytes"], 1)
        # tokens/s generating from 1 to hi tokens: average step time over the measured contexts, trapezoid in context
        def gen_time(model: str) -> float:
            pts = sorted((r["context"], r["median_ms"]) for r in decode if r["model"] == model and r["batch"] == b)
            area = sum((c2 - c1) * (t1 + t2) / 2 for (c1, t1), (c2, t2) in zip(pts, pts[1:])) + pts[0][0] * pts[0][1]
            return area
        out[f"b{b}_t2r_over_softmax_tokens_per_s_generating_{hi}"] = gen_time("softmax") / gen_time("t2r")
    for L in cfg.train_lengths:
        try:
            sd = next(r for r in train if r["variant"] == "sdpa_softmax" and r["length"] == L)
            ck = next(r for r in train if r["variant"] == "chunkwise" and r["length"] == L)
        except StopIteration:
            continue
        out[f"train_chunkwise_speedup_vs_sdpa_L{L}"] = sd["median_ms"] / ck["median_ms"]
    return out


def write_report(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    lines = [f"# Benchmark results\n\nCommand: `{res['command']}`  \nMachine: {res['machine']}\n",
             "## Decode (one incremental step; median of repeats)\n",
             "| model | batch | context | ms/step | spread ms | tokens/s | state MiB |", "|---|---|---|---|---|---|---|"]
    for r in res["decode"]:
        lines.append(f"| {r['model']} | {r['batch']} | {r['context']} | {r['median_ms']:.2f} | {r['spread_ms']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['state_bytes'] / 2**20:.3f} |")
    lines += ["", "## Training (attention core, forward + backward)\n",
              "| variant | L | ms | spread ms | saved activations MiB |", "|---|---|---|---|---|"]
    for r in res["train"]:
        lines.append(f"| {r['variant']} | {r['length']} | {r['median_ms']:.2f} | {r['spread_ms']:.2f} | "
                     f"{r['saved_activation_bytes'] / 2**20:.1f} |")
    lines += ["", "## Ratios (same run)\n", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in res["summary"].items()]
    lines += ["", f"Peak resident memory of the benchmark process: {res['peak_rss_mib']:.0f} MiB"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plots(res, out)


def _plots(res: dict, out: Path) -> None:
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for b in sorted({r["batch"] for r in res["decode"]}):
        for model in ("softmax", "t2r", "no_attention"):
            pts = [(r["context"], r["median_ms"]) for r in res["decode"] if r["batch"] == b and r["model"] == model]
            axes[0].plot(*zip(*pts), marker="o", label=f"{model}, batch {b}")
    axes[0].set(xscale="log", yscale="log", xlabel="context length", ylabel="ms per decode step", title="Decode step time")
    axes[0].legend(fontsize=7)
    for variant in sorted({r["variant"] for r in res["train"] if "_c" not in r["variant"]}):
        pts = [(r["length"], r["median_ms"]) for r in res["train"] if r["variant"] == variant]
        axes[1].plot(*zip(*pts), marker="o", label=variant)
    axes[1].set(xscale="log", yscale="log", xlabel="sequence length", ylabel="ms fwd+bwd", title="Training attention core")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=110)
    plt.close(fig)


def _ints(s: str) -> List[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv: List[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--contexts", type=_ints, default=_ints("64,256,1024,2048,4096,8192"))
    ap.add_argument("--batches", type=_ints, default=_ints("1,16"))
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--feature-size", type=int, default=32)
    ap.add_argument("--train-lengths", type=_ints, default=_ints("512,1024,2048,4096,8192"))
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--train-heads", type=int, default=8)
    ap.add_argument("--train-head-dim", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--chunk-sweep", type=_ints, default=_ints("16,32,64,128,256"))
    ap.add_argument("--naive-max-length", type=int, default=4096, help="skip the O(L^2) form above this length")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", choices=["decode", "train"], action="append", default=[])
    ap.add_argument("--tiny", action="store_true", help="seconds-scale configuration (what the tests run)")
    cfg = ap.parse_args(argv)
    if cfg.tiny:
        cfg.contexts, cfg.batches, cfg.layers, cfg.dim, cfg.heads, cfg.vocab = [8, 32], [1, 2], 2, 32, 4, 100
        cfg.feature_size, cfg.train_lengths, cfg.train_batch, cfg.train_heads = 8, [64, 128], 1, 2
        cfg.train_head_dim, cfg.chunk_sweep, cfg.warmup, cfg.repeats = 16, [16, 32], 1, 2
    torch.manual_seed(0)
    torch.set_num_threads(cfg.threads)
    decode = bench_decode(cfg) if "decode" not in cfg.skip else []
    train = bench_training(cfg) if "train" not in cfg.skip else []
    res = {
        "command": "python -m t2r_fairseq.bench " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}, {cfg.threads} threads",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
        "decode": decode,
        "train": train,
        "summary": summarise(decode, train, cfg) if decode and train else {},
        "peak_rss_mib": peak_rss_mib(),
    }
    write_report(res, cfg.out)
    print((cfg.out / "results.md").read_text())


if __name__ == "__main__":
    main()
