"""Session fixtures shared by the CLI-level tests: tiny corpora binarised with fairseq-preprocess and
softmax teachers trained with fairseq-train, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import LM_TASK, MT_TASK, TRAIN, VOCAB, run, write_corpus


def _translate(line: str) -> str:
    """A learnable toy 'language pair': reverse the sentence and map each word."""
    return " ".join(VOCAB[(VOCAB.index(w) + 7) % len(VOCAB)] for w in reversed(line.split()))


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    raw = root / "raw"
    raw.mkdir()
    for split, n, seed in [("train", 800, 1), ("valid", 200, 2), ("test", 60, 3)]:
        write_corpus(raw / f"lm.{split}", n, seed)
        write_corpus(raw / f"mt.{split}.src", n, seed + 10)
        (raw / f"mt.{split}.tgt").write_text("".join(_translate(l) + "\n" for l in (raw / f"mt.{split}.src").read_text().splitlines()))
    run("fairseq-preprocess", "--only-source", "--trainpref", raw / "lm.train", "--validpref", raw / "lm.valid",
        "--testpref", raw / "lm.test", "--destdir", root / "bin-lm", "--workers", "1")
    run("fairseq-preprocess", "-s", "src", "-t", "tgt", "--joined-dictionary", "--trainpref", raw / "mt.train",
        "--validpref", raw / "mt.valid", "--testpref", raw / "mt.test", "--destdir", root / "bin-mt", "--workers", "1")
    run("fairseq-train", root / "bin-lm", *LM_TASK, "--arch", "transformer_lm", *TRAIN, "--max-update", "30",
        "--save-dir", root / "lm-teacher")
    run("fairseq-train", root / "bin-mt", *MT_TASK, "--arch", "transformer", *TRAIN, "--max-update", "40",
        "--save-dir", root / "mt-teacher")
    return root
