"""The full-size rehearsal's pieces (``recipes/rehearse.sh``): synthetic data, a measured run, the report.

A paper recipe fails expensively: on a GPU node, after the data is prepared, at its real dimensions and
vocabulary. ``recipes/rehearse.sh`` runs each recipe's own stages at those sizes on the CPU for a handful of
updates, on synthetic data of the real vocabulary size; this module gives it what fairseq does not:

* ``data``: a synthetic corpus in the recipe's data layout (WikiText-103 token files, or parallel
  ``train/valid/test.{src,tgt}`` with raw references) and its dictionary file(s) of exactly the recipe's size.
  Token frequencies are Zipfian, so a model that learns anything at all shows a falling loss within a few
  updates; the target side of a translation pair is a fixed permutation of the source tokens;
* ``measure``: run a command and record its wall time and the peak resident memory of its largest process
  (``getrusage(RUSAGE_CHILDREN)``: every descendant that was waited for, so ``bash recipe.sh`` reports its
  fairseq process);
* ``report``: read a finetune log (``common.log_interval=1``) and the measurements, check that the loss is
  finite and fell, and write one Markdown row (plus a JSON record) a user can size a GPU job from.

    python -m t2r_fairseq.tools.rehearsal data --recipe wmt14_ende --out DIR [--vocab N] [--train-lines N]
    python -m t2r_fairseq.tools.rehearsal measure --out M.json -- CMD ...
    python -m t2r_fairseq.tools.rehearsal report --recipe R --log finetune.log --measured a.json b.json ... --md OUT.md
"""

from __future__ import annotations

import argparse
import json
import math
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

# The recipes' real dictionary sizes (fairseq Dictionary entries, its 4 special symbols included).
#   wikitext103_lm: the public adaptive_lm_wiki103.v2 dictionary the recipe binarises with (267,744 types).
#   wmt14_ende:     the public wmt16.en-de.joined-dict transformer's joined dictionary (32,768 types).
#   wmt14_enfr:     the public wmt14.en-fr.joined-dict transformer's joined dictionary (about 44.5k types; the
#                   recipe's own 40k-merge BPE lands near it).
#   wmt17_zhen:     SPM_VOCAB = 32,000 pieces per language (separate dictionaries), + fairseq's specials, padded to 8.
VOCAB = {"wikitext103_lm": 267_744, "wmt14_ende": 32_768, "wmt14_enfr": 44_512, "wmt17_zhen": 32_008}
LANGS = {"wmt14_ende": ("en", "de"), "wmt14_enfr": ("en", "fr"), "wmt17_zhen": ("zh", "en")}
SPECIALS = 4  # <s> <pad> </s> <unk>


class RehearsalError(RuntimeError):
    """The rehearsed run did not do what a real run must (loss not finite, not falling, nothing saved)."""


# ---- data -------------------------------------------------------------------------------------------------


def _zipf(vocab: int, rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` word ids in ``[0, vocab)`` with Zipfian frequencies (id 0 the most frequent)."""
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    p = 1.0 / (ranks + 5.0) ** 1.1
    return rng.choice(vocab, size=count, p=p / p.sum())


def _lines(ids: np.ndarray, lengths: Sequence[int]) -> List[str]:
    out, start = [], 0
    for n in lengths:
        out.append(" ".join(f"w{i}" for i in ids[start:start + n]))
        start += n
    return out


def write_dictionary(path: Path, words: int) -> None:
    """``w0 .. w{words-1}`` with descending counts: fairseq keeps the file's order, so ``w<i>`` has id i + 4."""
    path.write_text("".join(f"w{i} {words - i}\n" for i in range(words)))


def write_data(recipe: str, out: Path, vocab: Optional[int] = None, train_lines: int = 2000, seed: int = 1) -> int:
    """The synthetic corpus and dictionaries of ``recipe`` under ``out``; returns the dictionary size."""
    size = vocab or VOCAB[recipe]
    words = size - SPECIALS
    if words < 16:
        raise RehearsalError(f"--vocab {size} is too small (at least {16 + SPECIALS})")
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    # valid: over 8 blocks / batches even at 512 tokens per block (fairseq 0.12 drops a last batch smaller than
    # --required-batch-size-multiple, 8 by default: a smaller split would validate nothing and fail)
    splits = {"train": train_lines, "valid": max(train_lines // 20, 100), "test": max(train_lines // 100, 20)}
    if recipe == "wikitext103_lm":
        write_dictionary(out / "dict.txt", words)
        for split, lines in splits.items():
            lengths = rng.integers(20, 120, size=lines)
            text = _lines(_zipf(words, rng, int(lengths.sum())), lengths)
            (out / f"wiki.{split}.tokens").write_text("\n".join(text) + "\n")
        return size
    src, tgt = LANGS[recipe]
    joined = recipe != "wmt17_zhen"
    for lang in (src, tgt) if not joined else ("joined",):
        write_dictionary(out / f"dict.{lang}.txt", words)
    permutation = rng.permutation(words)
    (out / "ref").mkdir(exist_ok=True)
    for split, lines in splits.items():
        lengths = rng.integers(8, 40, size=lines)
        source = _zipf(words, rng, int(lengths.sum()))
        (out / f"{split}.{src}").write_text("\n".join(_lines(source, lengths)) + "\n")
        (out / f"{split}.{tgt}").write_text("\n".join(_lines(permutation[source], lengths)) + "\n")
    (out / "ref" / f"test.{tgt}").write_text((out / f"test.{tgt}").read_text())
    return size


# ---- measure ----------------------------------------------------------------------------------------------


def measure(command: Sequence[str], out: Path) -> Dict[str, float]:
    """Run ``command``; write and return its wall seconds and peak RSS (MiB) of its largest process."""
    start = time.monotonic()
    code = subprocess.call(list(command))
    seconds = time.monotonic() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    record = {"command": " ".join(command), "exit": code, "seconds": round(seconds, 1),
              "peak_rss_mib": round(peak_kib / 1024, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    if code != 0:
        raise RehearsalError(f"{command[0]} exited with {code} (measured in {out})")
    return record


# ---- report -----------------------------------------------------------------------------------------------

# fairseq-train's "2026-01-01 10:00:00 | INFO | train_inner | ..." and fairseq-hydra-train's
# "[2026-01-01 10:00:00,123][train_inner][INFO] - ..." lines; the time stamp is finer than fairseq's whole-second wall.
_INNER = re.compile(
    r"^\[?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:,\d+)?)\D.*?train_inner\W.*?\bloss=([^,\s]+).*?\bnum_updates=(\d+)",
    re.MULTILINE,
)


def _seconds(stamp: str) -> float:
    day, clock = stamp.split(" ")
    h, m, s = clock.replace(",", ".").split(":")
    return time.mktime(time.strptime(day, "%Y-%m-%d")) + int(h) * 3600 + int(m) * 60 + float(s)


def training_curve(log: str) -> List[tuple[int, float, float]]:
    """``(update, loss, time stamp in seconds)`` of every ``train_inner`` line (log interval 1: one per update)."""
    return [(int(m.group(3)), float(m.group(2)), _seconds(m.group(1))) for m in _INNER.finditer(log)]


def check_curve(curve: List[tuple[int, float, float]]) -> None:
    """The rehearsal's pass criterion: at least two updates logged, every loss finite, the last below the first."""
    if len(curve) < 2:
        raise RehearsalError(f"expected one train_inner line per update (common.log_interval=1), found {len(curve)}")
    losses = [loss for _, loss, _ in curve]
    if not all(math.isfinite(x) for x in losses):
        raise RehearsalError(f"a training loss is not finite: {losses}")
    if not losses[-1] < losses[0]:
        raise RehearsalError(f"the training loss did not fall: {losses}")


def seconds_per_update(curve: List[tuple[int, float, float]]) -> float:
    """Wall seconds per update after the first (which also pays for start-up and the first allocations)."""
    (u0, _, w0), (u1, _, w1) = curve[0], curve[-1]
    return (w1 - w0) / max(u1 - u0, 1)


def report(recipe: str, log: Path, measured: Sequence[Path], md: Path, json_out: Optional[Path] = None) -> dict:
    curve = training_curve(log.read_text(errors="replace"))
    try:
        check_curve(curve)
        verdict = ""
    except RehearsalError as err:  # still write the row: a failed rehearsal is a result too
        if not curve:
            raise
        verdict = f" (FAILED: {err})"
    runs = {p.stem: json.loads(p.read_text()) for p in measured}
    row = {
        "recipe": recipe,
        "updates": curve[-1][0],
        "loss_first": curve[0][1],
        "loss_last": curve[-1][1],
        "seconds_per_update": round(seconds_per_update(curve), 3),
        **{f"{name}_peak_rss_gib": round(r["peak_rss_mib"] / 1024, 2) for name, r in runs.items()},
        **{f"{name}_seconds": r["seconds"] for name, r in runs.items()},
    }
    cells = [recipe, str(row["updates"]), f"{row['loss_first']:.2f} -> {row['loss_last']:.2f}{verdict}",
             f"{row['seconds_per_update']:.3g}"]
    for name in ("teacher", "calibrate", "finetune", "eval"):
        if name in runs:
            cells.append(f"{runs[name]['peak_rss_mib'] / 1024:.1f} GiB / {runs[name]['seconds']:.0f} s")
        else:
            cells.append("-")
    md.parent.mkdir(parents=True, exist_ok=True)
    with md.open("a") as f:
        f.write("| " + " | ".join(cells) + " |\n")
    if json_out is not None:
        json_out.write_text(json.dumps(row, indent=1) + "\n")
    if verdict:
        raise RehearsalError(verdict.strip(" ()"))
    return row


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m t2r_fairseq.tools.rehearsal", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="synthetic corpus + dictionaries of a recipe's vocabulary size")
    d.add_argument("--recipe", required=True, choices=sorted(VOCAB))
    d.add_argument("--out", required=True, type=Path)
    d.add_argument("--vocab", type=int, default=None, help="dictionary size (default: the recipe's real one)")
    d.add_argument("--train-lines", type=int, default=2000)
    d.add_argument("--seed", type=int, default=1)
    m = sub.add_parser("measure", help="run a command, record wall time and peak RSS")
    m.add_argument("--out", required=True, type=Path)
    m.add_argument("command", nargs=argparse.REMAINDER)
    r = sub.add_parser("report", help="check a finetune log and append the rehearsal's row")
    r.add_argument("--recipe", required=True)
    r.add_argument("--log", required=True, type=Path)
    r.add_argument("--measured", nargs="*", type=Path, default=[])
    r.add_argument("--md", required=True, type=Path)
    r.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "data":
            print(write_data(args.recipe, args.out, args.vocab, args.train_lines, args.seed))
        elif args.cmd == "measure":
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not command:
                ap.error("measure: give the command after --")
            print(json.dumps(measure(command, args.out)))
        else:
            print(json.dumps(report(args.recipe, args.log, args.measured, args.md, args.json)))
    except RehearsalError as err:
        sys.exit(f"rehearsal: {err}")


if __name__ == "__main__":
    main()
