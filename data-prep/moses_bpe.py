#!/usr/bin/env python3
"""fairseq's WMT text pipeline (Moses tokenisation, corpus cleaning, joint BPE) without Perl or git clones.

fairseq's ``examples/translation/prepare-wmt14en2{de,fr}.sh`` run the Moses Perl scripts and subword-nmt from
git checkouts. This module does the same steps with the PyPI packages ``sacremoses`` (a Python port of the Moses
tokenizer and punctuation normaliser) and ``subword_nmt``, streaming (constant memory) and in parallel over
``--workers`` processes with the output order preserved:

* ``tokenize``: train mode = normalize-punctuation -> remove-non-printing-char (every Unicode ``C*`` character
  becomes a space) -> tokenizer ``-a`` (aggressive hyphen splitting, ``@-@``) with Moses escaping; test mode =
  ``’`` -> ``'`` then tokenizer ``-a`` (exactly what fairseq does to newstest2014).
* ``clean``: clean-corpus-n: collapse whitespace, drop a pair if either side has fewer than ``min`` or more than
  ``max`` tokens or the token ratio exceeds ``ratio`` either way.
* ``learn-bpe`` / ``apply-bpe``: joint BPE (one code file learned on the concatenation of both sides).

Every output is written to ``NAME.tmp`` and renamed when complete, so a killed run leaves no partial file
under a final name.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

CHUNK_LINES = 2000


def open_text(path: Path):
    """Read a text corpus (``.gz`` transparently), tolerating invalid UTF-8 as the Perl tools do."""
    if str(path).endswith(".gz"):
        import gzip
        return gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="\n")
    return open(path, encoding="utf-8", errors="replace", newline="\n")


class AtomicWriter:
    """A text file written to ``PATH.tmp`` and renamed to ``PATH`` only by ``commit()`` (context exit w/o error)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.tmp, "w", encoding="utf-8", newline="\n")
        return self.f

    def __exit__(self, exc_type, exc, tb):
        self.f.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
        return False


# -- tokenisation -----------------------------------------------------------------------------------------

_STATE: dict = {}


def _init_tok(lang: str, mode: str) -> None:
    import regex
    from sacremoses import MosesPunctNormalizer, MosesTokenizer

    _STATE.update(tok=MosesTokenizer(lang=lang), norm=MosesPunctNormalizer(lang=lang),
                  nonprint=regex.compile(r"\p{C}"), mode=mode)


def tokenize_line(line: str) -> str:
    """One line through the Moses steps for the mode set by ``_init_tok`` (train or test)."""
    s = _STATE
    line = line.rstrip("\n")
    if s["mode"] == "train":
        line = s["nonprint"].sub(" ", s["norm"].normalize(line))
    else:
        line = line.replace("\u2019", "'")
    return s["tok"].tokenize(line, aggressive_dash_splits=True, return_str=True, escape=True).strip()


def _tok_chunk(lines: list[str]) -> list[str]:
    return [tokenize_line(l) for l in lines]


def _chunks(lines: Iterable[str], n: int = CHUNK_LINES) -> Iterator[list[str]]:
    it = iter(lines)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def _parallel_map(func, init, initargs, lines: Iterable[str], workers: int) -> Iterator[str]:
    """``func`` over chunks of ``lines`` in ``workers`` processes, yielding results in input order."""
    if workers <= 1:
        init(*initargs)
        for chunk in _chunks(lines):
            yield from func(chunk)
        return
    ctx = mp.get_context("fork" if sys.platform != "win32" else "spawn")
    chunks = _chunks(lines)
    with ctx.Pool(workers, initializer=init, initargs=initargs) as pool:
        # A bounded window of chunks at a time: Pool.imap alone would read the whole input into memory
        # (its feeder thread runs ahead of the workers), which for giga-fren means tens of GB.
        while window := list(itertools.islice(chunks, 4 * workers)):
            for out in pool.imap(func, window):
                yield from out


def tokenize_files(inputs: list[Path], out: Path, lang: str, mode: str = "train", workers: int = 1) -> int:
    """Tokenise the concatenation of ``inputs`` into ``out``; returns the number of lines."""
    def lines():
        for p in inputs:
            with open_text(p) as f:
                yield from f
    n = 0
    with AtomicWriter(out) as w:
        for line in _parallel_map(_tok_chunk, _init_tok, (lang, mode), lines(), workers):
            w.write(line + "\n")
            n += 1
    return n


# -- cleaning -----------------------------------------------------------------------------------------------

def keep_pair(src: str, tgt: str, ratio: float, min_len: int, max_len: int) -> tuple[str, str] | None:
    """clean-corpus-n's rule for one pair: the whitespace-normalised pair, or None to drop it."""
    s, t = " ".join(src.split()), " ".join(tgt.split())
    if not s or not t:
        return None
    ns, nt = s.count(" ") + 1, t.count(" ") + 1
    if not (min_len <= ns <= max_len and min_len <= nt <= max_len):
        return None
    if ns / nt > ratio or nt / ns > ratio:
        return None
    return s, t


def clean_pair_files(src_in: Path, tgt_in: Path, src_out: Path, tgt_out: Path,
                     ratio: float = 1.5, min_len: int = 1, max_len: int = 250) -> tuple[int, int]:
    """Filter a parallel corpus line by line; returns (kept, total). Both files must have equal line counts."""
    kept = total = 0
    with open_text(src_in) as fs, open_text(tgt_in) as ft, AtomicWriter(src_out) as ws, AtomicWriter(tgt_out) as wt:
        for s, t in itertools.zip_longest(fs, ft):
            if s is None or t is None:
                raise SystemExit(f"error: {src_in} and {tgt_in} have different numbers of lines; "
                                 "they must be line-aligned (re-extract them)")
            total += 1
            pair = keep_pair(s, t, ratio, min_len, max_len)
            if pair:
                ws.write(pair[0] + "\n")
                wt.write(pair[1] + "\n")
                kept += 1
    return kept, total


# -- BPE ----------------------------------------------------------------------------------------------------

def learn_joint_bpe(inputs: list[Path], codes: Path, symbols: int, workers: int = 1) -> None:
    """subword-nmt learn_bpe on the concatenation of ``inputs`` (both languages: joint BPE, as fairseq)."""
    from subword_nmt.learn_bpe import learn_bpe

    def lines():
        for p in inputs:
            with open_text(p) as f:
                yield from f
    with AtomicWriter(codes) as out:
        learn_bpe(lines(), out, symbols, min_frequency=2, num_workers=1)


def _init_bpe(codes: str) -> None:
    from subword_nmt.apply_bpe import BPE

    with open(codes, encoding="utf-8") as f:
        _STATE["bpe"] = BPE(f)


def _bpe_chunk(lines: list[str]) -> list[str]:
    bpe = _STATE["bpe"]
    return [bpe.process_line(l.rstrip("\n")).strip() for l in lines]


def apply_bpe_file(codes: Path, inp: Path, out: Path, workers: int = 1) -> int:
    """Segment ``inp`` with BPE ``codes`` (``@@ `` continuation markers) into ``out``; returns the line count."""
    n = 0
    with open_text(inp) as f, AtomicWriter(out) as w:
        for line in _parallel_map(_bpe_chunk, _init_bpe, (str(codes),), f, workers):
            w.write(line + "\n")
            n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenize", help="Moses normalise/tokenise files (concatenated) into one output")
    t.add_argument("--lang", required=True)
    t.add_argument("--mode", choices=["train", "test"], default="train")
    t.add_argument("--workers", type=int, default=1)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("inputs", type=Path, nargs="+")
    c = sub.add_parser("clean", help="clean-corpus-n on a line-aligned pair")
    c.add_argument("src_in", type=Path)
    c.add_argument("tgt_in", type=Path)
    c.add_argument("src_out", type=Path)
    c.add_argument("tgt_out", type=Path)
    c.add_argument("--ratio", type=float, default=1.5)
    c.add_argument("--min", type=int, default=1)
    c.add_argument("--max", type=int, default=250)
    lb = sub.add_parser("learn-bpe", help="learn joint BPE codes on the concatenation of the inputs")
    lb.add_argument("--symbols", type=int, default=40000)
    lb.add_argument("--codes", type=Path, required=True)
    lb.add_argument("inputs", type=Path, nargs="+")
    ab = sub.add_parser("apply-bpe", help="apply BPE codes to a file")
    ab.add_argument("--codes", type=Path, required=True)
    ab.add_argument("--workers", type=int, default=1)
    ab.add_argument("inp", type=Path)
    ab.add_argument("out", type=Path)
    a = ap.parse_args(argv)
    for p in getattr(a, "inputs", []) + [x for x in [getattr(a, "inp", None), getattr(a, "src_in", None)] if x]:
        if not Path(p).is_file():
            ap.error(f"input file {p} does not exist")
    if a.cmd == "tokenize":
        n = tokenize_files(a.inputs, a.out, a.lang, a.mode, a.workers)
        print(f"tokenized {n} lines -> {a.out}")
    elif a.cmd == "clean":
        kept, total = clean_pair_files(a.src_in, a.tgt_in, a.src_out, a.tgt_out, a.ratio, a.min, a.max)
        print(f"kept {kept} of {total} pairs -> {a.src_out}, {a.tgt_out}")
    elif a.cmd == "learn-bpe":
        learn_joint_bpe(a.inputs, a.codes, a.symbols)
        print(f"BPE codes -> {a.codes}")
    else:
        n = apply_bpe_file(a.codes, a.inp, a.out, a.workers)
        print(f"applied BPE to {n} lines -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
