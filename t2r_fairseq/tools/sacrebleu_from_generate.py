"""Score ``fairseq-generate`` output with sacreBLEU and print the signature.

fairseq's ``--scoring sacrebleu`` prints the score but not sacreBLEU's signature,
which is what makes a BLEU number comparable. This reads the generate log, takes
the detokenised hypotheses (``D-`` lines, i.e. after ``--post-process``) and the
references (``T-`` lines), restores corpus order, and scores them with sacreBLEU.

    python -m t2r_fairseq.tools.sacrebleu_from_generate generate.log [--tokenize 13a]

For the paper recipes (recipes/wmt*.sh), which segment with Moses + BPE:

* ``--ref FILE``: score against the raw (untokenised) reference file, one line per
  test sentence in corpus order, instead of the ``T-`` lines (which are tokenised
  and, for unknown words, contain ``<unk>``): the detokenised BLEU that is
  comparable across papers.
* ``--detok-lang LANG``: Moses-detokenise the hypotheses first (sacremoses), for
  output that is BPE-free (``--remove-bpe``) but still Moses-tokenised.
* ``--compound-split``: the tokenised BLEU that WMT14 EN-DE papers (Vaswani et al.
  2017, Ott et al. 2018, Kasai et al. 2021) report: hypotheses and ``T-``
  references as fairseq prints them (tokenised, BPE removed), each hyphen between
  two non-spaces split into ``##AT##-##AT##`` as in fairseq's
  ``scripts/compound_split_bleu.sh``, then BLEU without further tokenisation.
* ``--tokenised``: the same tokenised BLEU without the compound splitting (the
  convention of most WMT14 EN-FR tables).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import sacrebleu

_COMPOUND = re.compile(r"(\S)-(\S)")


def read_pairs(text: str) -> tuple[list[str], list[str]]:
    """(hypotheses, references) from ``D-``/``T-`` lines, in corpus order (first ``D-`` per id = best)."""
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


def read_hypotheses_by_id(text: str) -> dict[int, str]:
    """Best hypothesis (``D-`` line) per sentence id, without requiring ``T-`` lines."""
    hyps: dict[int, str] = {}
    for line in text.splitlines():
        m = re.match(r"^D-(\d+)\t(.*)$", line)
        if m:
            rest = m.group(2)
            hyps.setdefault(int(m.group(1)), rest.split("\t", 1)[1] if "\t" in rest else "")
    return hyps


def align_to_reference_file(hyps: dict[int, str], ref_lines: list[str]) -> tuple[list[str], list[str]]:
    """Pair ids 0..n-1 of the generate output with the lines of a raw reference file.

    fairseq's sentence ids are the line numbers of the binarised test split, so they index the reference
    file directly; every line must have been translated (a dropped sentence would silently inflate BLEU).
    """
    missing = [i for i in range(len(ref_lines)) if i not in hyps]
    extra = [i for i in hyps if i >= len(ref_lines)]
    if missing or extra:
        raise ValueError(
            f"the generate output has {len(hyps)} hypotheses but the reference file has {len(ref_lines)} lines "
            f"(missing ids: {missing[:5]}{'...' if len(missing) > 5 else ''}, ids beyond the file: {extra[:5]}); "
            "was the test split filtered or generated with --skip-invalid-size-inputs-valid-test?"
        )
    return [hyps[i] for i in range(len(ref_lines))], ref_lines


def compound_split(line: str) -> str:
    """fairseq's compound splitting: ``a-b`` -> ``a ##AT##-##AT## b`` (non-overlapping, left to right, like perl s///g)."""
    return _COMPOUND.sub(r"\1 ##AT##-##AT## \2", line)


def moses_detokenize(lines: list[str], lang: str) -> list[str]:
    """Undo Moses tokenisation (including escaped entities and ``@-@`` aggressive hyphens)."""
    from sacremoses import MosesDetokenizer

    detok = MosesDetokenizer(lang=lang)
    return [detok.detokenize(line.replace(" @-@ ", "-").split()) for line in lines]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log", type=Path)
    ap.add_argument("--tokenize", default="13a", help="sacreBLEU tokenizer (13a; zh for Chinese targets; intl ...)")
    ap.add_argument("--ref", type=Path, help="raw reference file (one line per test sentence) instead of the T- lines")
    ap.add_argument("--detok-lang", help="Moses-detokenise the hypotheses for this language before scoring")
    ap.add_argument("--compound-split", action="store_true",
                    help="tokenised compound-split BLEU on the D-/T- lines (the WMT14 EN-DE convention)")
    ap.add_argument("--tokenised", action="store_true",
                    help="tokenised BLEU on the D-/T- lines as fairseq prints them (no compound splitting)")
    ap.add_argument("--label", default="", help="text appended to the result line, e.g. the recipe and model")
    args = ap.parse_args(argv)
    text = args.log.read_text(encoding="utf-8", errors="replace")
    suffix = f" [{args.label}]" if args.label else ""
    try:
        if args.compound_split or args.tokenised:
            if args.ref or args.detok_lang:
                raise ValueError("--compound-split/--tokenised score the tokenised D-/T- lines; drop --ref/--detok-lang")
            hyps, refs = read_pairs(text)
            kind = "tokenised BLEU"
            if args.compound_split:
                hyps, refs = [compound_split(h) for h in hyps], [compound_split(r) for r in refs]
                kind = "compound-split BLEU"
            bleu = sacrebleu.metrics.BLEU(tokenize="none", force=True)
            score = bleu.corpus_score(hyps, [refs])
            print(f"{kind} = {score.score:.2f} ({len(hyps)} sentences; signature: {bleu.get_signature()}){suffix}")
            return
        if args.ref:
            ref_lines = args.ref.read_text(encoding="utf-8").splitlines()
            hyps, refs = align_to_reference_file(read_hypotheses_by_id(text), ref_lines)
        else:
            hyps, refs = read_pairs(text)
    except (ValueError, OSError) as exc:
        sys.exit(f"error: {args.log}: {exc}")
    if args.detok_lang:
        hyps = moses_detokenize(hyps, args.detok_lang)
    bleu = sacrebleu.metrics.BLEU(tokenize=args.tokenize)
    score = bleu.corpus_score(hyps, [refs])
    print(f"sacreBLEU = {score.score:.2f} ({len(hyps)} sentences) signature: {bleu.get_signature()}{suffix}")


if __name__ == "__main__":
    main()
