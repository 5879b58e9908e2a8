"""A translation split of long sentences, made by joining consecutive pairs of an existing fairseq data-bin split.

    python -m t2r_fairseq.tools.concat_sources DATA_BIN OUT_BIN --src en --tgt de [--subset test] [--join 16]

Each output pair is ``--join`` consecutive source sentences (and their references) joined into one: the
sentence-final EOS of all but the last is dropped, so fairseq reads one long sentence. The dictionaries are copied
unchanged, so every model of DATA_BIN reads OUT_BIN. It is how the generation benchmark gets sources of hundreds of
tokens from a sentence-level test set (Multi30k: 16 sentences ~ 250 source tokens) without a new corpus.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Sequence

import torch


def join_split(data: Path, out: Path, prefix: str, lang: str, join: int) -> int:
    """Write ``out/prefix.lang.{bin,idx}`` from ``data``'s; returns the number of joined sentences."""
    from fairseq.data import Dictionary, data_utils, indexed_dataset

    dictionary = Dictionary.load(str(data / f"dict.{lang}.txt"))
    source = data_utils.load_indexed_dataset(str(data / f"{prefix}.{lang}"), dictionary)
    if source is None:
        raise SystemExit(f"concat_sources: no split {data / prefix}.{lang}.bin/.idx (check --subset, --src, --tgt)")
    builder = indexed_dataset.make_builder(str(out / f"{prefix}.{lang}.bin"), impl="mmap", vocab_size=len(dictionary))
    count = 0
    for start in range(0, len(source), join):
        parts = [source[i] for i in range(start, min(start + join, len(source)))]
        body = [p[:-1] if p.numel() and p[-1] == dictionary.eos() else p for p in parts[:-1]]
        builder.add_item(torch.cat(body + [parts[-1]]))
        count += 1
    builder.finalize(str(out / f"{prefix}.{lang}.idx"))
    return count


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="fairseq translation data-bin")
    parser.add_argument("out", type=Path, help="output data-bin (created; the dictionaries are copied)")
    parser.add_argument("--src", required=True)
    parser.add_argument("--tgt", required=True)
    parser.add_argument("--subset", default="test", help="split to join (written under the same name)")
    parser.add_argument("--join", type=int, default=16, help="consecutive sentences per output sentence")
    args = parser.parse_args(argv)
    if args.join < 1:
        parser.error("--join must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = f"{args.subset}.{args.src}-{args.tgt}"
    counts = set()
    for lang in (args.src, args.tgt):
        shutil.copyfile(args.data / f"dict.{lang}.txt", args.out / f"dict.{lang}.txt")
        counts.add(join_split(args.data, args.out, prefix, lang, args.join))
    print(f"concat_sources: {counts.pop()} sentences of {args.join} joined pairs -> {args.out / prefix}")


if __name__ == "__main__":
    main(sys.argv[1:])
