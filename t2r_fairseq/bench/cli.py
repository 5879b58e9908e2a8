"""``python -m t2r_fairseq.bench``: the command line, one run, one report.

    python -m t2r_fairseq.bench --out bench-out                 # CPU, the defaults below
    python -m t2r_fairseq.bench --out bench-gpu --device cuda --dtype bfloat16 --threads 0

1. decode: one incremental step of fairseq's softmax transformer (KV cache) vs
   the T2R model of the same size (``(S, z)`` state) vs the attention-free lower
   bound, for the LM and for MT (cross-attention: cached source summary vs the
   KV of the source), at each context length and batch size;
2. decode memory: bytes of the incremental state, and the peak memory of each
   configuration (resident set on the CPU, allocator peak on CUDA);
3. training: forward + backward of the attention core vs sequence length for
   chunkwise linear attention, SDPA softmax and the naive quadratic form (plus
   fla's kernel where installed on CUDA), and a chunk-size sweep;
4. with ``--cross-feature-size K`` (MT): T2R with a K-feature cross-attention
   map beside T2R (decode rows ``t2r_xkK``);
5. with ``--sliding-window W``: the hybrid (softmax over the last W positions
   + linear attention over the rest) beside T2R in the decode and training
   tables (model ``t2r_hybrid_wW``, variant ``hybrid_wW``).

Each figure is the median of ``--repeats`` timed calls after ``--warmup``
untimed ones, with the spread beside it. Output: ``results.md``,
``results.json`` and ``bench.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import List, Optional

import torch

from t2r_fairseq.bench.decode import bench_decode
from t2r_fairseq.bench.measure import process_peak_rss_mib
from t2r_fairseq.bench.report import summarise, write_report
from t2r_fairseq.bench.train import bench_training
from t2r_fairseq.devices import parse_device


def _ints(s: str) -> List[int]:
    try:
        values = [int(x) for x in s.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return sorted(set(values))


def _tasks(s: str) -> List[str]:
    tasks = [x for x in s.split(",") if x]
    bad = [t for t in tasks if t not in ("lm", "mt")]
    if bad or not tasks:
        raise argparse.ArgumentTypeError(f"tasks are lm and/or mt, got {s!r}")
    return tasks


def _paths(s: str) -> List[str]:
    from t2r_fairseq.bench.static_decode import PATHS

    paths = [x for x in s.split(",") if x]
    bad = [p for p in paths if p not in PATHS]
    if bad or not paths:
        raise argparse.ArgumentTypeError(f"decode paths are {', '.join(PATHS)}; got {s!r}")
    return list(dict.fromkeys(paths))


TINY = {
    "contexts": [8, 32], "batches": [1, 2], "layers": 2, "dim": 32, "heads": 4, "vocab": 100, "feature_size": 8,
    "train_lengths": [64, 128], "train_batch": 1, "train_heads": 2, "train_head_dim": 16, "chunk_sweep": [16, 32],
    "warmup": 1, "repeats": 2,
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m t2r_fairseq.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-out"), help="directory for results.md/.json, bench.png")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="model/activation dtype (half precision on CUDA only); linear states stay fp32")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0: leave torch's default)")
    g = ap.add_argument_group("decode")
    g.add_argument("--tasks", type=_tasks, default=["lm", "mt"], help="lm, mt or lm,mt")
    g.add_argument("--contexts", type=_ints, default=_ints("64,256,1024,2048,4096,8192"))
    g.add_argument("--batches", type=_ints, default=_ints("1,16"))
    g.add_argument("--mt-source-length", type=int, default=0,
                   help="MT source length (0: equal to the target context, as in document-level translation)")
    g.add_argument("--layers", type=int, default=6, help="decoder layers (and encoder layers for MT)")
    g.add_argument("--dim", type=int, default=512)
    g.add_argument("--heads", type=int, default=8)
    g.add_argument("--vocab", type=int, default=32000)
    g.add_argument("--feature-size", type=int, default=32)
    g.add_argument("--cross-feature-size", type=int, default=0, metavar="K",
                   help="MT: also time T2R whose encoder-decoder attention has K features per head (the model's "
                        "--cross-feature-size; rows t2r_xkK beside t2r, whose cross-attention has the plugin's default, 128; "
                        "32 = the paper's); 0: no such rows")
    g.add_argument("--sliding-window", type=int, default=0, metavar="W",
                   help="also time the hybrid sliding-window attention with a W-token window (decode rows "
                        "t2r_hybrid_wW, training rows hybrid_wW); 0: no hybrid rows")
    g.add_argument("--compare-qk", action="store_true",
                   help="also time T2R with the t2r_qk map (the keys' own layer; rows t2r_qk): same shapes as t2r")
    g.add_argument("--compare-unfused", action="store_true",
                   help="also time T2R with generation's fast path off (separate q/k/v and feature-map "
                        "matmuls, out-of-place state update)")
    g.add_argument("--decode-steps", type=_paths, default=["eager"],
                   help="decode paths timed, comma-separated: eager (fairseq's forward with its KV cache / T2R's "
                        "recurrent step), compile, graph, compile_graph (static buffers; T2R through generation's "
                        "--decode-step runner, softmax over a static KV cache with SDPA; graph = CUDA-graph capture, "
                        "uncaptured on CPU). Rows name their path")
    g.add_argument("--memory-budget-gib", type=float, default=0.0, metavar="G",
                   help="also time, at each --budget-contexts length, the largest batch whose decode state fits "
                        "G GiB (rows marked with the budget); 0: no such rows")
    g.add_argument("--budget-contexts", type=_ints, default=_ints("2048,8192"))
    g.add_argument("--budget-max-batch", type=int, default=4096, help="cap of the budget rows' batch")
    g = ap.add_argument_group("training")
    g.add_argument("--train-lengths", type=_ints, default=_ints("512,1024,2048,4096,8192"))
    g.add_argument("--train-batch", type=int, default=4)
    g.add_argument("--train-heads", type=int, default=8)
    g.add_argument("--train-head-dim", type=int, default=64)
    g.add_argument("--chunk-size", type=int, default=64)
    g.add_argument("--chunk-sweep", type=_ints, default=_ints("16,32,64,128,256"))
    g.add_argument("--naive-max-length", type=int, default=2048, help="skip the O(L^2) form above this length")
    # Top-k attention (Gupta et al. 2021): the chunked op of t2r_fairseq.topk.ops.
    g.add_argument("--topk-k", type=int, default=32, help="also time chunked top-k attention with this k (0: skip)")
    g.add_argument("--topk-query-chunk", type=int, default=256, help="top-k attention's query chunk")
    g.add_argument("--topk-decode-k", type=int, default=0,
                   help="also time decode steps of the top-k attention models (topk_transformer[_lm]) keeping K cached "
                   "keys per step (0: skip)")
    g = ap.add_argument_group("run")
    g.add_argument("--warmup", type=int, default=2)
    g.add_argument("--repeats", type=int, default=7)
    g.add_argument("--skip", choices=["decode", "train"], action="append", default=[])
    g.add_argument("--tiny", action="store_true", help="seconds-scale configuration (what the tests run)")
    return ap


def _check(ap: argparse.ArgumentParser, cfg: argparse.Namespace) -> None:
    """Refuse a configuration that cannot run, before anything is built."""
    try:
        device = parse_device(cfg.device)
    except ValueError as e:
        ap.error(str(e))
    if device.type == "cpu" and cfg.dtype != "float32":
        ap.error(f"--dtype {cfg.dtype} is for CUDA; CPU runs are float32")
    if cfg.dim % cfg.heads:
        ap.error(f"--dim {cfg.dim} must be divisible by --heads {cfg.heads}")
    if cfg.sliding_window < 0:
        ap.error(f"--sliding-window must be >= 0 (0: no hybrid rows), got {cfg.sliding_window}")
    if cfg.feature_size < 1 or cfg.cross_feature_size < 0:
        ap.error(f"--feature-size must be >= 1 and --cross-feature-size >= 0 (0: no such rows), got "
                 f"{cfg.feature_size} and {cfg.cross_feature_size}")
    if cfg.topk_decode_k < 0:
        ap.error(f"--topk-decode-k must be >= 0 (0: no top-k decode rows), got {cfg.topk_decode_k}")
    if cfg.memory_budget_gib < 0 or cfg.budget_max_batch < 1:
        ap.error("--memory-budget-gib must be >= 0 (0: no budget rows) and --budget-max-batch >= 1")
    if cfg.repeats < 1 or cfg.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")


def main(argv: Optional[List[str]] = None) -> dict:
    """Run the benchmark, write the report, return the results (also what the tests inspect)."""
    ap = parser()
    cfg = ap.parse_args(argv)
    if cfg.tiny:  # tiny values replace the defaults, not what was given explicitly
        defaults = vars(ap.parse_args([]))
        for key, value in TINY.items():
            if getattr(cfg, key) == defaults[key]:
                setattr(cfg, key, value)
    _check(ap, cfg)
    torch.manual_seed(0)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    decode = bench_decode(cfg) if "decode" not in cfg.skip else []
    train = bench_training(cfg) if "train" not in cfg.skip else []
    device = torch.device(cfg.device)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    res = {
        "command": "python -m t2r_fairseq.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} {platform.processor() or ''}{gpu}, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads, {cfg.device} {cfg.dtype}",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
        "decode": decode,
        "train": train,
        "summary": summarise(decode, train, cfg),
        "peak_rss_mib": process_peak_rss_mib(),
    }
    write_report(res, cfg.out)
    print((cfg.out / "results.md").read_text())
    return res
