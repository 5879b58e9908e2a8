"""Score ``fairseq-generate`` output with sacreBLEU and print the signature.

fairseq's ``--scoring sacrebleu`` prints the score but not sacreBLEU's signature,
which is what makes a BLEU number comparable. This reads the generate log, takes
the detokenised hypotheses (``D-`` lines, i.e. after ``--post-process``) and the
references (``T-`` lines), restores corpus order, and scores them with sacreBLEU.

    python -m t2r_fairseq.tools.sacrebleu_from_generate generate.log [--tokenize 13a]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import sacrebleu


def read_pairs(text: str) -> tuple[list[str], list[str]]:
    hyps: dict[int, str] = {}
    refs: dict[int, str] = {}
    for line in text.splitlines():
        m = re.match(r"^([DT])-(\d+)\t(.*)$", line)
        if not m:
            continue
        kind, idx, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "D":
            hyps.setdefault(idx, rest.split("\t", 1)[1] if "\t" in rest else "")  # "score\ttext"; first = best
        else:
            refs[idx] = rest
    if not hyps or set(hyps) != set(refs):
        raise ValueError(f"expected matching D-/T- lines in the generate output (got {len(hyps)} hypotheses, {len(refs)} references)")
    order = sorted(refs)
    return [hyps[i] for i in order], [refs[i] for i in order]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log", type=Path)
    ap.add_argument("--tokenize", default="13a", help="sacreBLEU tokenizer (13a; zh for Chinese targets; intl ...)")
    args = ap.parse_args()
    try:
        hyps, refs = read_pairs(args.log.read_text(encoding="utf-8", errors="replace"))
    except ValueError as exc:
        sys.exit(f"error: {args.log}: {exc}")
    bleu = sacrebleu.metrics.BLEU(tokenize=args.tokenize)
    score = bleu.corpus_score(hyps, [refs])
    print(f"sacreBLEU = {score.score:.2f} ({len(hyps)} sentences) signature: {bleu.get_signature()}")


if __name__ == "__main__":
    main()
