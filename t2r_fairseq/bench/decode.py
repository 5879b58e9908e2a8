"""Decode benchmark: one incremental step of a fairseq decoder at a given context length.

Three models of the same size, built through fairseq's own argument parsing
(random weights: speed does not depend on them):

* ``softmax``: fairseq's ``transformer_lm`` / ``transformer`` with its KV cache
  (self-attention keys/values of the prefix; for MT also the static keys/values
  of the source, read in full at every step);
* ``t2r``: ``t2r_transformer_lm`` / ``t2r_transformer`` with the ``(S, z)``
  state (for MT the cross-attention state is the cached source summary);
* ``t2r_unfused`` (with ``--compare-unfused``): T2R with generation's fast
  path switched off (``fast_generation = False``): separate q/k/v and per-head
  feature-map matmuls, and an out-of-place ``(S, z)`` update — the before/after
  of both optimisations in one run;
* ``t2r_xk`` (MT, with ``--cross-feature-size K``, rows named ``t2r_xkK``): T2R
  whose encoder-decoder attention has its own feature size K (self-attention
  keeps ``--feature-size``): what a larger cross-attention map costs per step
  and in the cached source summary, beside ``t2r`` in the same run;
* ``t2r_qk`` (with ``--compare-qk``): T2R with the ``t2r_qk`` map (the keys'
  own layer); its per-step work and state have the shapes of ``t2r``'s, and
  these rows show that in the same run;
* ``t2r_hybrid`` (with ``--sliding-window W``, rows named ``t2r_hybrid_wW``):
  T2R whose decoder self-attention is the sliding-window hybrid; its state is a
  ``W``-token KV ring buffer plus ``(S, z)`` (cross-attention as T2R);
* ``topk`` (with ``--topk-decode-k K``, rows named ``topk_kK``): fairseq's
  softmax model with top-k attention in every attention (``topk_transformer_lm``
  / ``topk_transformer``): the same KV cache as softmax, each step keeps the
  K best of the cached keys;
* ``no_attention``: the attention-free lower bound — the same model whose
  attention blocks keep their projections but mix no tokens and keep no state.

The incremental state is pre-filled to the context length (random contents of
the right shapes), so a step at context 8192 costs one step, and fairseq's own
decoder computes it (embeddings, positions, layers, output projection), as in
``fairseq-generate``.
"""

from __future__ import annotations

import argparse
import copy
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from t2r_fairseq.bench.measure import peak_memory_mib, reset_peak_memory, timeit
from t2r_fairseq.bench.static_decode import static_step

KINDS = ("no_attention", "t2r", "t2r_xk", "t2r_qk", "t2r_unfused", "t2r_hybrid", "topk", "softmax")
KV_CACHE_KINDS = ("topk", "softmax")  # state grows with the prefix: timed last (see bench_decode)
# Kinds with a static decode path (--decode-steps beyond eager): T2R through generation's runner, softmax over a
# static KV cache with SDPA, the bound with no state. The unfused T2R, the hybrid's ring buffer and top-k: eager only.
STATIC_KINDS = ("no_attention", "t2r", "t2r_xk", "t2r_qk", "softmax")


def model_label(kind: str, cfg: argparse.Namespace) -> str:
    """The row's model name: the kind, with the window spelled out for the hybrid."""
    if kind == "topk":
        return f"topk_k{cfg.topk_decode_k}"
    if kind == "t2r_xk":
        return f"t2r_xk{cfg.cross_feature_size}"
    return f"t2r_hybrid_w{cfg.sliding_window}" if kind == "t2r_hybrid" else kind


class _MixingFreeAttention(nn.Module):
    """An attention block with its token mixing removed: the attention-free lower bound.

    It keeps the per-token projections every attention variant pays for at a
    decode step, and nothing else: no state, no mixing. Self-attention projects
    the new token with q, k and v and returns ``out_proj(v)``; encoder-decoder
    attention projects only the query (the source's keys and values are
    computed once per sentence, off the per-token path) and returns
    ``out_proj(q)``. What T2R costs above this is the price of its feature maps
    and recurrent state; what softmax costs above it is its KV cache.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.cross = bool(getattr(attn, "encoder_decoder_attention", False))
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj

    def forward(self, query: Tensor, key: Optional[Tensor] = None, value: Optional[Tensor] = None, **kwargs):  # noqa: ANN201
        q = self.q_proj(query)
        if self.cross:
            return self.out_proj(q), None
        self.k_proj(query)
        return self.out_proj(self.v_proj(query)), None

    def _get_input_buffer(self, incremental_state):  # noqa: ANN001,ANN202 - fairseq's interface
        return {}

    def _set_input_buffer(self, incremental_state, buffer):  # noqa: ANN001,ANN202
        return incremental_state


def _dictionary(vocab: int):  # noqa: ANN202 - fairseq Dictionary
    from fairseq.data import Dictionary

    d = Dictionary()
    for i in range(vocab - len(d)):
        d.add_symbol(f"w{i}")
    return d


def build_model(task: str, kind: str, cfg: argparse.Namespace, max_positions: int) -> nn.Module:
    """A fairseq LM (``task='lm'``) or translation model (``'mt'``) of kind ``softmax``/``t2r``/``no_attention``."""
    from fairseq import options, tasks

    import t2r_fairseq  # noqa: F401  (registers the T2R models)

    dictionary = _dictionary(cfg.vocab)
    dim, ffn, heads, layers = str(cfg.dim), str(4 * cfg.dim), str(cfg.heads), str(cfg.layers)
    linear = kind.startswith("t2r")
    prefix = "t2r_" if linear else ("topk_" if kind == "topk" else "")
    if task == "lm":
        arch = prefix + "transformer_lm"
        argv = ["--task", "language_modeling", "--decoder-input-dim", dim, "--decoder-output-dim", dim,
                "--tokens-per-sample", str(max_positions)]
    else:
        arch = prefix + "transformer"
        argv = ["--task", "translation", "-s", "src", "-t", "tgt", "--encoder-layers", layers,
                "--encoder-embed-dim", dim, "--encoder-ffn-embed-dim", ffn, "--encoder-attention-heads", heads,
                "--max-source-positions", str(max_positions)]
    argv = ["/nonexistent", "--arch", arch, *argv, "--decoder-layers", layers, "--decoder-embed-dim", dim,
            "--decoder-ffn-embed-dim", ffn, "--decoder-attention-heads", heads,
            "--max-target-positions", str(max_positions), "--share-decoder-input-output-embed", "--cpu"]
    if linear:
        argv += ["--feature-size", str(cfg.feature_size)]
    if kind == "t2r_xk":
        argv += ["--cross-feature-size", str(cfg.cross_feature_size)]
    if kind == "t2r_qk":
        argv += ["--feature-map", "t2r_qk"]
    if kind == "t2r_hybrid":
        argv += ["--sliding-window", str(cfg.sliding_window)]
    if kind == "topk":
        argv += ["--topk-k", str(cfg.topk_decode_k)]
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    if task == "lm":
        fairseq_task = tasks.language_modeling.LanguageModelingTask(args, dictionary, dictionary)
    else:
        fairseq_task = tasks.translation.TranslationTask(args, dictionary, dictionary)
    model = fairseq_task.build_model(args).eval()
    if kind == "no_attention":
        for layer in model.decoder.layers:
            layer.self_attn = _MixingFreeAttention(layer.self_attn)
            if getattr(layer, "encoder_attn", None) is not None:
                layer.encoder_attn = _MixingFreeAttention(layer.encoder_attn)
    if kind == "t2r_unfused":
        for module in model.modules():
            if hasattr(module, "fast_generation"):
                module.fast_generation = False
    model.make_generation_fast_()
    return model


def _attention_buffer(attn: nn.Module, kind: str, batch: int, length: int, device: torch.device, dtype) -> dict:  # noqa: ANN001
    H, d = attn.num_heads, attn.head_dim
    if kind in KV_CACHE_KINDS:
        shape = (batch, H, length, d)
        return {"prev_key": torch.randn(shape, device=device, dtype=dtype),
                "prev_value": torch.randn(shape, device=device, dtype=dtype), "prev_key_padding_mask": None}
    K = attn.feature_map.output_dim  # the linear state is fp32 whatever the model dtype
    linear = {"S": torch.rand(batch, H, K, d, device=device), "z": torch.rand(batch, H, K, device=device) + 1.0}
    W = getattr(attn, "window", 0)
    if not W:
        return linear
    # the hybrid's ring buffer after ``length`` positions: slot p % W holds position p
    return {"window_keys": torch.randn(batch, H, W, d, device=device, dtype=dtype),
            "window_values": torch.randn(batch, H, W, d, device=device, dtype=dtype),
            "window_valid": (torch.arange(W, device=device) < length).expand(batch, W).contiguous(),
            "window_pos": torch.full((batch,), length, dtype=torch.long, device=device), **linear}


def prefill_state(model: nn.Module, kind: str, batch: int, context: int, source_length: int = 0) -> dict:
    """An incremental state as if ``context`` tokens had been decoded against a ``source_length`` source."""
    state: dict = {}
    if kind == "no_attention":
        return state
    p = next(model.parameters())
    for layer in model.decoder.layers:
        layer.self_attn._set_input_buffer(state, _attention_buffer(layer.self_attn, kind, batch, context, p.device, p.dtype))
        if source_length and getattr(layer, "encoder_attn", None) is not None:
            buffer = _attention_buffer(layer.encoder_attn, kind, batch, source_length, p.device, p.dtype)
            layer.encoder_attn._set_input_buffer(state, buffer)
    return state


def fake_encoder_out(model: nn.Module, batch: int, source_length: int, dim: int) -> Dict[str, List[Tensor]]:
    """fairseq's encoder output layout for a source of ``source_length`` (the encoder runs once per sentence,
    off the per-token path, so it is not timed); its contents are irrelevant once the cross state is cached."""
    p = next(model.parameters())
    x = torch.randn(source_length, batch, dim, device=p.device, dtype=p.dtype)
    pad = torch.zeros(batch, source_length, dtype=torch.bool, device=p.device)
    return {"encoder_out": [x], "encoder_padding_mask": [pad], "encoder_embedding": [], "encoder_states": [],
            "src_tokens": [], "src_lengths": []}


def state_bytes(state: dict) -> int:
    """Bytes of the distinct tensors in a fairseq incremental state (KV cache, or T2R's ``(S, z)`` and cached source
    state): a tensor held under two keys counts once, entries that are not tensors (flags, lengths) not at all."""
    seen = set()
    total = 0
    for buffer in state.values():
        for t in buffer.values() if isinstance(buffer, dict) else ():
            if isinstance(t, torch.Tensor) and (t.data_ptr(), t.shape) not in seen:
                seen.add((t.data_ptr(), t.shape))
                total += t.numel() * t.element_size()
    return total


def _eager_step(model: nn.Module, tokens: Tensor, base: dict, encoder_out: Optional[dict]) -> Callable[[], None]:
    def step() -> None:
        # A fresh shallow copy per call: the step must not grow the cache the next repetition measures.
        state = {k: dict(v) for k, v in base.items()}
        model.decoder(tokens, encoder_out=encoder_out, incremental_state=state)

    return step


@torch.no_grad()
def time_step(task: str, kind: str, path: str, model: nn.Module, cfg: argparse.Namespace, batch: int,
              context: int) -> dict:
    """One row: a decode step of ``model`` on ``path`` at ``batch`` x ``context``."""
    device = torch.device(cfg.device)
    source_length = (cfg.mt_source_length or context) if task == "mt" else 0
    own_peak = reset_peak_memory(device)
    tokens = torch.randint(4, cfg.vocab, (batch, context + 1), device=device)
    base = prefill_state(model, kind, batch, context, source_length)
    state_size = state_bytes(base)
    if path == "eager":
        encoder_out = fake_encoder_out(model, batch, source_length, cfg.dim) if task == "mt" else None
        step = _eager_step(model, tokens, base, encoder_out)
    else:
        if path.startswith("compile"):
            torch._dynamo.reset()  # a fresh compile per row: rows must not share (or exhaust) dynamo's cache
        if kind == "softmax":  # its static KV cache replaces the attentions: on a copy, one per row
            model = copy.deepcopy(model)
            base = {}
        step = static_step(model, kind, path, tokens, base, source_length)
    t = timeit(step, cfg.warmup, cfg.repeats, device)
    row = {"task": task, "model": model_label(kind, cfg), "path": path, "batch": batch, "context": context,
           "source_length": source_length, **t, "tokens_per_s": batch * 1000 / t["median_ms"],
           "state_bytes": state_size, "peak_mem_mib": peak_memory_mib(device), "peak_is_per_row": own_peak}
    print(f"decode {task} {row['model']:>12} {path:>13} batch {batch:>4} context {context:>5}: "
          f"{t['median_ms']:8.2f} ms/step (spread {t['spread_ms']:.2f}), state {state_size / 2**20:9.2f} MiB, "
          f"peak {row['peak_mem_mib']:.0f} MiB", flush=True)
    return row


def paths_of(kind: str, cfg: argparse.Namespace) -> List[str]:
    """The decode paths timed for ``kind``: every --decode-steps path where the kind has it."""
    paths = getattr(cfg, "decode_steps", ["eager"])
    return [p for p in paths if p == "eager" or kind in STATIC_KINDS]


@torch.no_grad()
def bench_decode_model(task: str, kind: str, cfg: argparse.Namespace) -> List[dict]:
    """Time one decode step of one model at every (batch, context) and path; one row each."""
    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    max_ctx = max(cfg.contexts) + 8
    model = build_model(task, kind, cfg, max_positions=max(max_ctx, cfg.mt_source_length + 8)).to(device, dtype)
    rows = []
    for batch in cfg.batches:
        for context in cfg.contexts:
            for path in paths_of(kind, cfg):
                rows.append(time_step(task, kind, path, model, cfg, batch, context))
    rows += budget_rows(task, kind, model, cfg)
    return rows


def budget_rows(task: str, kind: str, model: nn.Module, cfg: argparse.Namespace) -> List[dict]:
    """With ``--memory-budget-gib G``: at each context of ``--budget-contexts``, the largest batch whose decode
    state (KV cache or ``(S, z)``) fits in G GiB (capped at ``--budget-max-batch``), and its step time."""
    budget = getattr(cfg, "memory_budget_gib", 0.0)
    if not budget or kind not in ("t2r", "softmax"):
        return []
    rows = []
    for context in cfg.budget_contexts:
        source_length = (cfg.mt_source_length or context) if task == "mt" else 0
        per_sequence = state_bytes(prefill_state(model, kind, 1, context, source_length))
        batch = min(int(budget * 2**30 // per_sequence), cfg.budget_max_batch)
        if batch < 1:
            print(f"decode {task} {kind}: one sequence's state at context {context} exceeds {budget} GiB", flush=True)
            continue
        for path in paths_of(kind, cfg):
            row = time_step(task, kind, path, model, cfg, batch, context)
            rows.append({**row, "budget_gib": budget, "budget_capped": batch == cfg.budget_max_batch})
    return rows


def bench_decode(cfg: argparse.Namespace) -> List[dict]:
    """Every task and model; the softmax models last.

    Their multi-GB KV caches at long contexts disturb the allocator and the CPU
    caches for whatever is timed right after them, so the models whose figures
    are compared with the bound (T2R, the bound itself) run first.
    """
    rows: List[dict] = []
    optional = {"t2r_unfused": cfg.compare_unfused, "t2r_qk": getattr(cfg, "compare_qk", False),
                "t2r_xk": getattr(cfg, "cross_feature_size", 0) > 0,
                "t2r_hybrid": getattr(cfg, "sliding_window", 0) > 0, "topk": getattr(cfg, "topk_decode_k", 0) > 0}
    kinds = [k for k in KINDS if optional.get(k, True)]
    order = [(t, k) for k in kinds if k not in KV_CACHE_KINDS for t in cfg.tasks if (k, t) != ("t2r_xk", "lm")]
    order += [(t, k) for k in kinds if k in KV_CACHE_KINDS for t in cfg.tasks]
    for task, kind in order:
        rows += bench_decode_model(task, kind, cfg)
    return rows
