"""Whole-generation throughput of several checkpoints, side by side, against the attention-free bound.

    python -m t2r_fairseq.tools.generate_speed DATA_BIN teacher=TEACHER.pt t2r=T2R.pt [NAME=CKPT ...]
        [--subset test] [--batch-size 128] [--beam 4] [--min-len N] [--max-len-a A] [--max-len-b B]
        [--reps 3] [--bound] [--threads N] [--out FILE.md]

What ``fairseq-generate`` spends its time on, model against model: fairseq's ``SequenceGenerator`` (beam search,
its reorders, finished hypotheses, the decoder's incremental steps) over every batch of a split, with fairseq's
own batching (sentences sorted by length, ``--batch-size`` sentences per batch). Data loading, detokenisation and
scoring, which are the same for every model, are left out. The models run in turn, ``--reps`` times over (after
one warm-up round), so every model sees the same machine load; each row is the median, and the ratios are
against the first model, measured in the same run.

``--min-len N --max-len-a 0 --max-len-b N`` forces every hypothesis to N tokens, so models of different quality
are timed on the same work (long outputs: N = 200+). ``--bound`` (forced lengths only: a model without attention
chooses other lengths) adds, for each model, the same generation with every attention layer replaced by the
identity (its input passed through): what the rest of the model and the generator cost, the speed no attention can
beat.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
from torch import nn

import t2r_fairseq  # noqa: F401  (registers the models)
from t2r_fairseq.modules.replaced_attention import attention_modules


@dataclass
class Row:
    name: str
    sentences: int = 0
    tokens: int = 0
    seconds: List[float] = field(default_factory=list)
    bound_seconds: List[float] = field(default_factory=list)

    def rate(self, seconds: List[float]) -> float:
        return self.sentences / statistics.median(seconds) if seconds else float("nan")


def parse_models(specs: Sequence[str], tool: str = "generate_speed") -> List[Tuple[str, str]]:
    """``NAME=CHECKPOINT`` arguments as ``(name, path)`` pairs, refused in one line naming ``tool`` when malformed
    or when two share a name (their rows could not be told apart). Shared by the tools that compare checkpoints."""
    models = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{tool}: model '{spec}' must be NAME=CHECKPOINT, e.g. teacher=checkpoint_best.pt")
        models.append((name, path))
    if len({n for n, _ in models}) != len(models):
        raise SystemExit(f"{tool}: model names must be distinct")
    return models


def attention_classes() -> Tuple[type, ...]:
    """Every attention module a fairseq or t2r_fairseq decoder/encoder layer may hold."""
    from fairseq.modules.multihead_attention import MultiheadAttention

    from t2r_fairseq.modules.linear_multihead_attention import LinearMultiheadAttention

    return (MultiheadAttention, LinearMultiheadAttention)


@contextlib.contextmanager
def attention_free(model: nn.Module) -> Iterator[None]:
    """Every attention module of ``model`` returns its query unchanged (and keeps no state) inside the block."""
    modules = [m for _, m in attention_modules(model, attention_classes())]
    for m in modules:
        m.forward = lambda query, *args, **kwargs: (query, None)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in modules:
            del m.forward


def load(path: str, data: str):
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data})
    model = models[0]
    model.eval()
    model.make_generation_fast_()
    return model, task


def batches(task, subset: str, batch_size: int) -> List[dict]:
    task.load_dataset(subset)
    dataset = task.dataset(subset)
    iterator = task.get_batch_iterator(
        dataset, max_sentences=batch_size, max_tokens=None, max_positions=None, ignore_invalid_inputs=False,
        required_batch_size_multiple=1, num_workers=0,
    ).next_epoch_itr(shuffle=False)
    return list(iterator)


@torch.no_grad()
def generate(model: nn.Module, task, data: List[dict], args: argparse.Namespace) -> Tuple[float, int, int]:
    """Seconds, sentences and generated tokens (best hypothesis, EOS included) for one pass over ``data``."""
    from fairseq.sequence_generator import SequenceGenerator

    generator = SequenceGenerator(
        [model], task.target_dictionary, beam_size=args.beam, min_len=args.min_len, max_len_a=args.max_len_a,
        max_len_b=args.max_len_b,
    )
    sentences = tokens = 0
    start = time.perf_counter()
    for sample in data:
        hypos = generator.generate([model], sample)
        sentences += len(hypos)
        tokens += sum(int(h[0]["tokens"].numel()) for h in hypos)
    return time.perf_counter() - start, sentences, tokens


def measure(args: argparse.Namespace) -> List[Row]:
    specs = parse_models(args.models)
    loaded = [(name, *load(path, args.data)) for name, path in specs]
    data = batches(loaded[0][2], args.subset, args.batch_size)
    if args.max_batches:
        data = data[: args.max_batches]
    rows = {name: Row(name) for name, _, _ in loaded}
    for rep in range(args.reps + 1):  # round 0 warms up (allocator, lazily built caches) and is not counted
        for name, model, task in loaded:
            seconds, sentences, tokens = generate(model, task, data, args)
            row = rows[name]
            if rep:
                row.seconds.append(seconds)
                row.sentences, row.tokens = sentences, tokens
            if args.bound:
                with attention_free(model):
                    bound, _, _ = generate(model, task, data, args)
                if rep:
                    row.bound_seconds.append(bound)
    return list(rows.values())


def table(rows: List[Row], args: argparse.Namespace) -> str:
    first = rows[0]
    head = "| model | sentences/s | x " + first.name + " | tokens/s | tokens/sentence |"
    sep = "|---|---|---|---|---|"
    if args.bound:
        head += " attention-free bound, sentences/s | share of the bound |"
        sep += "---|---|"
    lines = [head, sep]
    for row in rows:
        rate = row.rate(row.seconds)
        line = (f"| {row.name} | {rate:.1f} | {rate / first.rate(first.seconds):.2f}x | "
                f"{row.tokens / statistics.median(row.seconds):.0f} | {row.tokens / max(row.sentences, 1):.1f} |")
        if args.bound:
            bound = row.rate(row.bound_seconds)
            line += f" {bound:.1f} | {rate / bound:.2f} |"
        lines.append(line)
    lengths = f"--min-len {args.min_len} --max-len-a {args.max_len_a} --max-len-b {args.max_len_b}"
    lines += ["", f"Median of {args.reps} alternating rounds after one warm-up; {rows[0].sentences} sentences of "
              f"'{args.subset}', --batch-size {args.batch_size} --beam {args.beam} {lengths}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}, CPU."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="fairseq data-bin directory of the models' task")
    parser.add_argument("models", nargs="+", help="NAME=CHECKPOINT, the first is the reference of the ratios")
    parser.add_argument("--subset", default="test")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--min-len", type=int, default=1)
    parser.add_argument("--max-len-a", type=float, default=0.0)
    parser.add_argument("--max-len-b", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-batches", type=int, default=0, help="only the first N batches (0: all)")
    parser.add_argument("--bound", action="store_true", help="also time each model without attention")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.batch_size < 1 or args.beam < 1:
        parser.error("--reps, --batch-size and --beam must be at least 1")
    if args.bound and not (args.max_len_a == 0 and args.min_len == args.max_len_b):
        parser.error("--bound needs forced lengths (--min-len N --max-len-a 0 --max-len-b N): without attention a "
                     "model generates other lengths, and the bound would time other work")
    if args.threads:
        torch.set_num_threads(args.threads)
    text = table(measure(args), args)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
