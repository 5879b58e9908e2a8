"""Per-token loss against position in long documents: does a model still predict well far into a document?

    python -m t2r_fairseq.tools.position_loss DATA_BIN teacher=TEACHER.pt t2r=T2R.pt [NAME=CKPT ...]
        [--subset test] [--doc-tokens 16384] [--buckets 256,512,1024,...] [--window NAME=N ...]
        [--max-docs 0] [--threads N] [--out-dir DIR] [--name position_loss]

The split's token stream (fairseq's binarised language-modelling data, every line with its end-of-sentence token) is
cut into documents of ``--doc-tokens`` tokens; each model predicts every token of a document from the ones before
it, and the table reports the mean loss (nats) of the tokens whose position falls in each bucket ``[0, 256)``,
``[256, 512)``, ... . A model reads a document in windows of its own length, each starting afresh: a model with
linear attention (T2R) in one window, the whole document (its state carries everything before a token, O(1) per
token; its positions are extended to the document, which needs positions that extrapolate, e.g. fairseq's
sinusoidal ones); any other model in windows of the positions it was trained with (``max_target_positions``), so
its loss beyond them is that of a model that restarts -- what a softmax model can afford. ``--window NAME=N``
chooses the window of a model (e.g. the T2R model in blocks of its training length, to compare with the teacher
on equal terms).

Writes ``NAME.md`` (the table, the data and the command) and ``NAME.png`` (loss against position, log scale) into
``--out-dir``.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import t2r_fairseq  # noqa: F401  (registers the models)
from t2r_fairseq.modules.linear_multihead_attention import LinearMultiheadAttention
from t2r_fairseq.modules.replaced_attention import attention_modules
from t2r_fairseq.tools.generate_speed import parse_models


@dataclass
class Curve:
    """One model's summed loss and token count per position bucket."""

    name: str
    window: int
    loss: List[float] = field(default_factory=list)
    tokens: List[int] = field(default_factory=list)

    def mean(self, i: int) -> float:
        return self.loss[i] / self.tokens[i] if self.tokens[i] else float("nan")

    def overall(self) -> float:
        return sum(self.loss) / max(sum(self.tokens), 1)


def parse_windows(specs: Sequence[str], names: Sequence[str]) -> Dict[str, int]:
    windows = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or name not in names or not value.isdigit() or int(value) < 2:
            raise SystemExit(f"position_loss: --window '{spec}' must be NAME=N with NAME one of {', '.join(names)} "
                             "and N >= 2 tokens")
        windows[name] = int(value)
    return windows


def bucket_edges(spec: str, doc_tokens: int) -> List[int]:
    """Bucket boundaries ``[0, e1, e2, ..., doc_tokens]`` from the comma list, cut at the document length."""
    try:
        edges = sorted({int(e) for e in spec.split(",")})
    except ValueError:
        raise SystemExit(f"position_loss: --buckets must be a comma list of integers, not '{spec}'") from None
    if edges[0] < 1:
        raise SystemExit("position_loss: --buckets must be positive positions")
    return [0] + [e for e in edges if e < doc_tokens] + [doc_tokens]


def documents(task, data: str, subset: str, doc_tokens: int, max_docs: int) -> Tensor:
    """``[n, doc_tokens]``: the split's token stream cut into whole documents (the tail is left out)."""
    from fairseq.data import data_utils

    dataset = data_utils.load_indexed_dataset(str(Path(data) / subset), task.source_dictionary)
    if dataset is None:
        raise SystemExit(f"position_loss: no split '{subset}' in {data}")
    stream = torch.cat([dataset[i] for i in range(len(dataset))])
    n = stream.numel() // doc_tokens
    if max_docs:
        n = min(n, max_docs)
    if n == 0:
        raise SystemExit(f"position_loss: '{subset}' holds {stream.numel()} tokens, fewer than one document of "
                         f"--doc-tokens {doc_tokens}; lower --doc-tokens")
    return stream[: n * doc_tokens].view(n, doc_tokens)


def is_linear(model: nn.Module) -> bool:
    """A model whose decoder attention carries a state (T2R): it can read a whole document in one window."""
    return bool(attention_modules(model.decoder, LinearMultiheadAttention))


def load(path: str, data: str, positions: Optional[int]) -> Tuple[nn.Module, object]:
    from fairseq import checkpoint_utils

    overrides: dict = {"data": data}
    if positions:
        overrides.update(max_target_positions=positions, tokens_per_sample=positions)
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides=overrides)
    return models[0].eval(), task


@torch.no_grad()
def token_losses(model: nn.Module, doc: Tensor, window: int) -> Tensor:
    """``[doc_tokens - 1]``: the loss of token p+1 given tokens 0..p, the document read in windows of ``window``."""
    losses = []
    inputs, targets = doc[:-1], doc[1:]
    for start in range(0, inputs.numel(), window):
        src = inputs[start:start + window].unsqueeze(0)
        tgt = targets[start:start + window].unsqueeze(0)
        out = model(src)
        lprobs = model.get_normalized_probs(out, log_probs=True, sample={"target": tgt})
        losses.append(-lprobs.float().gather(-1, tgt.unsqueeze(-1))[0, :, 0])
    return torch.cat(losses)


def measure(args: argparse.Namespace) -> Tuple[List[Curve], int]:
    """Every model's :class:`Curve` over the same documents, and the number of documents."""
    specs = parse_models(args.models, "position_loss")
    windows = parse_windows(args.window, [n for n, _ in specs])
    edges = bucket_edges(args.buckets, args.doc_tokens)
    curves, docs = [], None
    for name, path in specs:
        probe, task = load(path, args.data, None)
        linear = is_linear(probe)
        trained = probe.decoder.max_positions()
        window = windows.get(name, args.doc_tokens if linear else trained)
        if window > trained and not linear:
            raise SystemExit(f"position_loss: '{name}' is not a linear-attention model; it reads at most its "
                             f"{trained} trained positions, not --window {window}")
        model = probe
        if window > trained:
            model, task = load(path, args.data, args.doc_tokens)
            if model.decoder.max_positions() < window:
                raise SystemExit(f"position_loss: '{name}' has positions up to {trained} only (learned positions do "
                                 f"not extrapolate); give --window {name}={trained}")
        if docs is None:
            docs = documents(task, args.data, args.subset, args.doc_tokens, args.max_docs)
        curve = Curve(name, window, [0.0] * (len(edges) - 1), [0] * (len(edges) - 1))
        for doc in docs:
            loss = token_losses(model, doc, window)
            positions = torch.arange(1, args.doc_tokens)
            for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
                keep = (positions >= lo) & (positions < hi)
                curve.loss[i] += float(loss[keep].sum())
                curve.tokens[i] += int(keep.sum())
        curves.append(curve)
        print(f"{name}: window {window}, mean loss {curve.overall():.4f} (ppl {math.exp(curve.overall()):.2f})",
              flush=True)
    return curves, len(docs)


def table(curves: List[Curve], args: argparse.Namespace, n_docs: int, command: str) -> str:
    edges = bucket_edges(args.buckets, args.doc_tokens)
    spans = [f"{lo}-{hi}" for lo, hi in zip(edges[:-1], edges[1:])]
    lines = ["| model | window | " + " | ".join(spans) + " | all (ppl) |", "|---" * (len(spans) + 3) + "|"]
    for c in curves:
        cells = [f"{c.mean(i):.3f}" for i in range(len(spans))]
        lines.append(f"| {c.name} | {c.window} | " + " | ".join(cells) + f" | {c.overall():.3f} ({math.exp(c.overall()):.2f}) |")
    lines += ["", f"Mean loss (nats) of the tokens at each position of {n_docs} documents of {args.doc_tokens} tokens "
              f"cut from '{args.subset}' of {args.data}; each window starts afresh. Command: `{command}`"]
    return "\n".join(lines) + "\n"


def plot(curves: List[Curve], args: argparse.Namespace, path: Path) -> None:
    from t2r_fairseq.tools.study_report import _pyplot

    plt = _pyplot()
    edges = bucket_edges(args.buckets, args.doc_tokens)
    mids = [math.sqrt(max(lo, 1) * hi) for lo, hi in zip(edges[:-1], edges[1:])]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for c in curves:
        ax.plot(mids, [c.mean(i) for i in range(len(mids))], marker="o", label=f"{c.name} (window {c.window})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the document (bucket)")
    ax.set_ylabel("mean loss per token (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="fairseq data-bin of the models' language-modelling task")
    parser.add_argument("models", nargs="+", help="NAME=CHECKPOINT")
    parser.add_argument("--subset", default="test")
    parser.add_argument("--doc-tokens", type=int, default=16384)
    parser.add_argument("--buckets", default="256,512,1024,2048,4096,8192,16384")
    parser.add_argument("--window", action="append", default=[], help="NAME=N: read NAME's documents in N-token windows")
    parser.add_argument("--max-docs", type=int, default=0, help="score only the first N documents (0: all)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path("."))
    parser.add_argument("--name", default="position_loss")
    args = parser.parse_args(argv)
    if args.doc_tokens < 2:
        parser.error("--doc-tokens must be at least 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    curves, n_docs = measure(args)
    text = table(curves, args, n_docs, "python -m t2r_fairseq.tools.position_loss " + " ".join(argv))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.md").write_text(text)
    plot(curves, args, args.out_dir / f"{args.name}.png")
    print(text)


if __name__ == "__main__":
    main()
