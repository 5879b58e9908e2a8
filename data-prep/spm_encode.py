#!/usr/bin/env python3
"""Train a sentencepiece model on raw text and encode splits, ready for fairseq-preprocess.

LM layout (``--kind lm``):  IN/{train,valid,test}.txt            -> OUT/{train,valid,test}.txt
MT layout (``--kind mt``):  IN/{train,valid,test}.{SRC,TGT}       -> OUT/{train,valid,test}.{SRC,TGT}
(one joint model for both MT sides, so ``--joined-dictionary`` can share embeddings).
Split names can be remapped, e.g. ``--splits train=valid,valid=valid,test=test`` to
train on WikiText-2's valid split. Output pieces are space-separated; decode with
``fairseq-generate --post-process sentencepiece``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import sentencepiece as spm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=["lm", "mt"], required=True)
    ap.add_argument("--in-dir", type=Path, required=True)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--src", default="en")
    ap.add_argument("--tgt", default="de")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--splits", default="train=train,valid=valid,test=test", help="OUTNAME=INNAME,...")
    ap.add_argument("--max-train-lines", type=int, default=2_000_000, help="cap for spm training input")
    args = ap.parse_args()

    splits = dict(item.split("=", 1) for item in args.splits.split(","))
    suffixes = ["txt"] if args.kind == "lm" else [args.src, args.tgt]
    missing = [str(args.in_dir / f"{name}.{s}") for name in splits.values() for s in suffixes if not (args.in_dir / f"{name}.{s}").is_file()]
    if missing:
        sys.exit(f"error: missing input file(s): {', '.join(missing)} (expected the {args.kind} layout, see --help)")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    model_prefix = args.out_dir / "spm"
    train_files = [str(args.in_dir / f"{splits['train']}.{s}") for s in suffixes]
    spm.SentencePieceTrainer.train(
        input=",".join(train_files), model_prefix=str(model_prefix), vocab_size=args.vocab_size,
        character_coverage=1.0, model_type="unigram", hard_vocab_limit=False,
        input_sentence_size=args.max_train_lines, shuffle_input_sentence=True, minloglevel=2,
        pad_id=-1, bos_id=-1, eos_id=-1, unk_id=0,
    )
    sp = spm.SentencePieceProcessor(model_file=f"{model_prefix}.model")
    for out_name, in_name in splits.items():
        for s in suffixes:
            lines = (args.in_dir / f"{in_name}.{s}").read_text(encoding="utf-8").splitlines()
            encoded = sp.encode([l.strip() for l in lines], out_type=str)
            (args.out_dir / f"{out_name}.{s}").write_text("".join(" ".join(p) + "\n" for p in encoded), encoding="utf-8")
    print(f"sentencepiece ({sp.get_piece_size()} pieces) -> {args.out_dir}")


if __name__ == "__main__":
    main()
