"""The accuracy/speed tradeoff of an accuracy study, as the paper draws it: quality against generation speed.

    python -m t2r_fairseq.tools.tradeoff runs/study --task mt [--rows ROW,...] [--subset test] [--reps 3]
        [--batch-size 128] [--beam 4] [--max-batches 0] [--out-dir docs] [--name tradeoff_mt]
    python -m t2r_fairseq.tools.tradeoff runs/study --task lm [--contexts 512,2048] [--lm-batch 1] ...

Reads the study's own evaluation logs (``OUT/eval/ROW.KIND.POINT.SUBSET.log``, as ``recipes/accuracy_study.sh``
writes them) and times the rows' checkpoints on this machine, every model in alternating rounds, so the speeds
are ratios measured in one run:

* **MT**: sacreBLEU at the end of each row's budget, the mean over its seeds (``ROW``, ``ROW_s2``, ...), on
  every evaluated subset, against ``fairseq-generate``'s sentences/s over the data-bin's ``--subset`` (fairseq's
  ``SequenceGenerator`` with the study's generation options: beam 4, ``--max-len-a 1.2 --max-len-b 10``), and the
  decoding state per sentence: the peak, over the steps of that generation, of the bytes in fairseq's incremental
  state (KV caches, or T2R's ``(S, z)`` and cached source state) per hypothesis, times the beam.
* **LM**: test perplexity (mean over seeds) against the decoder's tokens/s at each of ``--contexts`` (a real
  incremental decode of the checkpoint, the median step time over the 16 steps ending at that context), and the
  state at the largest context.

Writes ``NAME.md`` (the table and the command) and ``NAME.png`` (quality against speed, one point per row) into
``--out-dir``. The seed-1 checkpoint of a row is the one timed: seeds change the weights, not the work per step.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import t2r_fairseq  # noqa: F401  (registers the models)
from t2r_fairseq.bench import state_bytes
from t2r_fairseq.tools.study_report import SUBSET_NAMES, _pyplot, read_results

_SEED = re.compile(r"_s\d+$")


@dataclass
class Point:
    """One row of the tradeoff: a model's quality (per subset, over seeds) and its measured speed and state."""

    row: str
    checkpoint: Path
    updates: int
    quality: Dict[str, List[float]] = field(default_factory=dict)  # subset -> one value per seed
    seconds: Dict[str, List[float]] = field(default_factory=lambda: defaultdict(list))  # setting -> per round
    work: Dict[str, float] = field(default_factory=dict)  # setting -> sentences or tokens per pass
    state_bytes: float = 0.0

    def mean(self, subset: str) -> float:
        values = self.quality.get(subset, [])
        return statistics.mean(values) if values else float("nan")

    def rate(self, setting: str) -> float:
        return self.work[setting] / statistics.median(self.seconds[setting])


def base_row(row: str) -> str:
    """The row a seed variant belongs to: ``ROW_s2`` -> ``ROW``."""
    return _SEED.sub("", row)


def checkpoint_of(out: Path, row: str, kind: str, point: int) -> Optional[Path]:
    """The checkpoint a row was evaluated at: the teacher's best, else the row's save at ``point`` updates."""
    if row == "teacher":
        path = out / "checkpoints" / f"teacher.{kind}" / "checkpoint_best.pt"
        return path if path.exists() else None
    if point == 0:
        path = out / "checkpoints" / f"{row}.{kind}" / "checkpoint_0.pt"
        return path if path.exists() else None
    found = sorted((out / "checkpoints" / f"{row}.{kind}").glob(f"checkpoint_*_{point}.pt"))
    return found[0] if found else None


def collect(out: Path, kind: str, rows: Optional[Sequence[str]]) -> List[Point]:
    """Every row (seed variants folded into their row) with its end-of-budget quality and checkpoint.

    The end of a row's budget is the largest update count evaluated for it; seeds evaluated at another count are
    refused rather than averaged across budgets."""
    results, _ = read_results(out)
    by_row: Dict[str, Dict[str, Dict[int, float]]] = defaultdict(dict)  # row (with seed) -> subset -> point -> value
    for subset, table in results.get(kind, {}).items():
        for row, points in table.items():
            by_row[row][subset] = points
    if not by_row:
        raise SystemExit(f"tradeoff: no {kind} evaluation logs under {out / 'eval'} (run the study's eval stage)")
    wanted = list(rows) if rows else sorted({base_row(r) for r in by_row}, key=lambda r: (r != "teacher", r))
    points: List[Point] = []
    for name in wanted:
        seeds = sorted(r for r in by_row if base_row(r) == name)
        if not seeds:
            raise SystemExit(f"tradeoff: row '{name}' has no {kind} evaluation under {out / 'eval'}")
        ends = {r: max(p for subset in by_row[r].values() for p in subset) for r in seeds}
        if len(set(ends.values())) > 1:
            raise SystemExit(f"tradeoff: the seeds of '{name}' end at different update counts {ends}; "
                             "evaluate them at the same budget")
        end = ends[seeds[0]]
        checkpoint = checkpoint_of(out, seeds[0], kind, end)
        if checkpoint is None:
            raise SystemExit(f"tradeoff: no checkpoint of '{seeds[0]}' at {end} updates under {out / 'checkpoints'}")
        point = Point(name, checkpoint, end)
        for r in seeds:
            for subset, values in by_row[r].items():
                if end in values:
                    point.quality.setdefault(subset, []).append(values[end])
        points.append(point)
    return points


def load(path: Path, data: str, overrides: Optional[dict] = None) -> Tuple[nn.Module, object]:
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(path)], arg_overrides={"data": data, **(overrides or {})})
    model = models[0].eval()
    model.make_generation_fast_()
    return model, task


class StateMeter:
    """Peak incremental-state bytes per hypothesis over a generation, read after each decoder step.

    Wraps the decoder's ``forward`` on the instance: fairseq's generator passes the same incremental-state dict
    to every step, and each attention leaves its state in it once the step returns."""

    def __init__(self, decoder: nn.Module) -> None:
        self.decoder = decoder
        self.peak_per_row = 0.0

    def __enter__(self) -> "StateMeter":
        inner = self.decoder.forward

        def forward(prev_output_tokens, *args, **kwargs):  # noqa: ANN001,ANN202 - fairseq's signature
            result = inner(prev_output_tokens, *args, **kwargs)
            state = kwargs.get("incremental_state")
            if state:
                self.peak_per_row = max(self.peak_per_row, state_bytes(state) / prev_output_tokens.size(0))
            return result

        self.decoder.forward = forward  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.decoder.forward


def time_mt(points: List[Point], args: argparse.Namespace) -> None:
    """Sentences/s of whole generations over ``--subset``, the models in alternating rounds (round 0 warms up)."""
    from t2r_fairseq.tools.generate_speed import batches, generate

    loaded = [(p, *load(p.checkpoint, args.data)) for p in points]
    data = batches(loaded[0][2], args.subset, args.batch_size)
    if args.max_batches:
        data = data[: args.max_batches]
    gen = argparse.Namespace(beam=args.beam, min_len=1, max_len_a=args.max_len_a, max_len_b=args.max_len_b)
    for rep in range(args.reps + 1):
        for point, model, task in loaded:
            if rep == 0:
                with StateMeter(model.decoder) as meter:
                    generate(model, task, data, gen)
                point.state_bytes = meter.peak_per_row * args.beam
                continue
            seconds, sentences, _ = generate(model, task, data, gen)
            point.seconds["sentences"].append(seconds)
            point.work["sentences"] = sentences


@torch.no_grad()
def time_lm(points: List[Point], args: argparse.Namespace) -> None:
    """Tokens/s of an incremental decode to each context, the models in alternating rounds (round 0 warms up)."""
    from t2r_fairseq.tools.decode_speed import profile_decoder

    contexts = args.contexts
    overrides = {"max_target_positions": max(contexts), "tokens_per_sample": max(contexts)}
    loaded = [(p, load(p.checkpoint, args.data, overrides)[0]) for p in points]
    for rep in range(args.reps + 1):
        for point, model in loaded:
            rows = profile_decoder(model, contexts, args.lm_batch)
            if max(r["context"] for r in rows) < max(contexts):
                raise SystemExit(f"tradeoff: '{point.row}' decodes at most {model.decoder.max_positions()} positions, "
                                 f"fewer than --contexts {max(contexts)}")
            point.state_bytes = rows[-1]["state_bytes"] / args.lm_batch
            if rep:
                for r in rows:
                    setting = f"context {r['context']}"
                    point.seconds[setting].append(r["ms_per_token"] / 1000)
                    point.work[setting] = args.lm_batch


def settings(points: List[Point]) -> List[str]:
    return list(points[0].seconds)


def table(points: List[Point], args: argparse.Namespace, command: str) -> str:
    kind = args.task
    subsets = sorted({s for p in points for s in p.quality}, key=lambda s: (s != args.subset, s))
    names = SUBSET_NAMES.get(kind, {})
    metric = "BLEU" if kind == "mt" else "ppl"
    unit = "sentences/s" if kind == "mt" else "tokens/s"
    ref = points[0]
    cols = [f"{metric} `{names.get(s, s)}`" for s in subsets] + [f"{unit} ({s})" if kind == "lm" else unit
                                                                 for s in settings(points)]
    cols += [f"x {ref.row}" for _ in settings(points)]
    state = "state per sentence" if kind == "mt" else f"state at context {max(args.contexts)}"
    head = "| row | seeds | updates | " + " | ".join(cols) + f" | {state} |"
    lines = [head, "|---" * (len(cols) + 4) + "|"]
    for p in points:
        seeds = max((len(v) for v in p.quality.values()), default=0)
        cells = [f"{p.mean(s):.2f}" for s in subsets]
        cells += [f"{p.rate(s):.1f}" for s in settings(points)]
        cells += [f"{p.rate(s) / ref.rate(s):.2f}x" for s in settings(points)]
        lines.append(f"| {p.row} | {seeds} | {p.updates} | " + " | ".join(cells) + f" | {_size(p.state_bytes)} |")
    if kind == "mt":
        how = (f"{unit}: whole generations of `{args.subset}` ({int(ref.work['sentences'])} sentences, --batch-size "
               f"{args.batch_size} --beam {args.beam} --max-len-a {args.max_len_a} --max-len-b {args.max_len_b})")
    else:
        how = f"{unit}: incremental decoding at batch {args.lm_batch}, median step over the 16 ending at the context"
    lines += ["", f"{metric}: mean over the seeds at the end of each row's budget. {how}; median of {args.reps} "
              f"alternating rounds after a warm-up, {torch.get_num_threads()} threads, torch {torch.__version__}, "
              f"CPU. State: peak bytes of fairseq's incremental state. Command: `{command}`"]
    return "\n".join(lines) + "\n"


def _size(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def plot(points: List[Point], args: argparse.Namespace, path: Path) -> None:
    plt = _pyplot()
    setting_list = settings(points)
    fig, axes = plt.subplots(1, len(setting_list), figsize=(5.5 * len(setting_list), 4.2), squeeze=False)
    label = SUBSET_NAMES.get(args.task, {}).get(args.subset, args.subset)
    for ax, setting in zip(axes[0], setting_list):
        for p in points:
            x, y = p.rate(setting), p.mean(args.subset)
            ax.scatter([x], [y], s=36, marker="*" if p.row == "teacher" else "o")
            ax.annotate(p.row, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel("sentences/s (fairseq-generate)" if args.task == "mt" else f"tokens/s, {setting}")
        ax.set_ylabel(f"BLEU ({label})" if args.task == "mt" else "test perplexity (lower is better)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{args.task.upper()}: quality against speed (CPU, {torch.get_num_threads()} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="the accuracy study's --out directory")
    parser.add_argument("--task", choices=("mt", "lm"), required=True)
    parser.add_argument("--rows", help="comma list of rows, seed variants folded in (default: every evaluated row)")
    parser.add_argument("--data", help="data-bin (default: STUDY/data-bin/TASK)")
    parser.add_argument("--subset", default="test", help="the quality plotted; MT: also the split timed")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--max-len-a", type=float, default=1.2)
    parser.add_argument("--max-len-b", type=int, default=10)
    parser.add_argument("--max-batches", type=int, default=0, help="MT: only the first N batches (0: all)")
    parser.add_argument("--contexts", default="512,2048", help="LM: contexts the decode speed is read at")
    parser.add_argument("--lm-batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out-dir", type=Path, default=None, help="where NAME.md and NAME.png go (default: STUDY)")
    parser.add_argument("--name", default=None, help="file stem (default: tradeoff_TASK)")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.batch_size < 1 or args.beam < 1 or args.lm_batch < 1:
        parser.error("--reps, --batch-size, --beam and --lm-batch must be at least 1")
    try:
        args.contexts = sorted({int(c) for c in args.contexts.split(",")})
    except ValueError:
        parser.error(f"--contexts must be a comma list of integers, not '{args.contexts}'")
    if min(args.contexts) < 16:
        parser.error("--contexts must be at least 16 (the step time is the median of the 16 steps ending there)")
    args.data = args.data or str(args.study / "data-bin" / args.task)
    args.out_dir = args.out_dir or args.study
    args.name = args.name or f"tradeoff_{args.task}"
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if not Path(args.data).is_dir():
        raise SystemExit(f"tradeoff: no data-bin {args.data} (give --data)")
    if args.threads:
        torch.set_num_threads(args.threads)
    points = collect(args.study, args.task, args.rows.split(",") if args.rows else None)
    (time_mt if args.task == "mt" else time_lm)(points, args)
    command = "python -m t2r_fairseq.tools.tradeoff " + " ".join(argv)
    text = table(points, args, command)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.md").write_text(text)
    plot(points, args, args.out_dir / f"{args.name}.png")
    print(text)


if __name__ == "__main__":
    main()
