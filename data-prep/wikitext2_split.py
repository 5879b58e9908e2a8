#!/usr/bin/env python3
"""WikiText-2 as shipped here has only valid.txt and test.txt: make train/dev/test for an LM study.

    python data-prep/wikitext2_split.py IN_DIR OUT_DIR [--dev-fraction 0.1]

train = the articles of IN/valid.txt before the cut, valid (dev, for early stopping and tuning) = the
articles after it, test = IN/test.txt untouched. The cut falls on an article boundary (a top-level
" = Title = " heading) so no article is split between train and dev; tuning never sees the test set.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

TITLE = re.compile(r"^ = [^=].* = $")


def split_articles(lines: list[str], dev_fraction: float) -> tuple[list[str], list[str]]:
    """Cut ``lines`` at the first article heading at or after ``1 - dev_fraction`` of the tokens."""
    total = sum(len(l.split()) for l in lines)
    seen = 0
    for i, line in enumerate(lines):
        if TITLE.match(line.rstrip("\n")) and seen >= (1 - dev_fraction) * total:
            return lines[:i], lines[i:]
        seen += len(line.split())
    raise ValueError("no article heading after the cut point: is this WikiText (' = Title = ' headings)?")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("in_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--dev-fraction", type=float, default=0.1)
    args = ap.parse_args()
    for name in ("valid.txt", "test.txt"):
        if not (args.in_dir / name).is_file():
            sys.exit(f"error: {args.in_dir / name} not found: IN_DIR must hold WikiText-2's valid.txt and test.txt")
    if not 0 < args.dev_fraction < 1:
        sys.exit(f"error: --dev-fraction must be in (0, 1), got {args.dev_fraction}")
    lines = (args.in_dir / "valid.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    train, dev = split_articles(lines, args.dev_fraction)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "train.txt").write_text("".join(train), encoding="utf-8")
    (args.out_dir / "valid.txt").write_text("".join(dev), encoding="utf-8")
    (args.out_dir / "test.txt").write_text((args.in_dir / "test.txt").read_text(encoding="utf-8"), encoding="utf-8")
    count = lambda ls: sum(len(l.split()) for l in ls)  # noqa: E731
    print(f"train {count(train)} tokens, dev {count(dev)} tokens (from valid.txt), test = test.txt -> {args.out_dir}")


if __name__ == "__main__":
    main()
