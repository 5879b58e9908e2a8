"""Shared helpers: build tiny fairseq tasks/models through fairseq's own argument parsing."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch
from fairseq import options, tasks

REPO = Path(__file__).resolve().parents[1]
USER_DIR = str(REPO / "t2r_fairseq")

VOCAB = [f"w{i}" for i in range(20)]

LM_ARCH = [
    "--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-input-dim", "32",
    "--decoder-output-dim", "32", "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "4",
]
MT_ARCH = [
    "--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
]


def write_dict(path: Path, names: Sequence[str] = ("dict.txt",)) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name in names:
        (path / name).write_text("".join(f"{w} {100 - i}\n" for i, w in enumerate(VOCAB)))


def build(task_args: list[str], seed: int = 0):
    """(args, task, model) from a fairseq-train style command line, on CPU, in eval mode."""
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, task_args + ["--user-dir", USER_DIR, "--cpu", "--seed", str(seed)])
    torch.manual_seed(seed)
    task = tasks.setup_task(args)
    model = task.build_model(args)
    return args, task, model.eval()


def build_lm(data: Path, arch: str = "t2r_transformer_lm", extra: Sequence[str] = (), seed: int = 0):
    write_dict(data)
    return build([str(data), "--task", "language_modeling", "--arch", arch, "--tokens-per-sample", "64", *LM_ARCH, *extra], seed)


def build_mt(data: Path, arch: str = "t2r_transformer", extra: Sequence[str] = (), seed: int = 0):
    write_dict(data, ("dict.src.txt", "dict.tgt.txt"))
    return build([str(data), "--task", "translation", "-s", "src", "-t", "tgt", "--arch", arch, *MT_ARCH, *extra], seed)


def random_tokens(dictionary, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(dictionary.nspecial, len(dictionary), (batch, length), generator=g)


def write_corpus(path: Path, lines: int, seed: int) -> None:
    """Deterministic toy text (used by the CLI tests)."""
    rng = random.Random(seed)
    path.write_text("".join(" ".join(rng.choice(VOCAB) for _ in range(rng.randint(4, 12))) + "\n" for _ in range(lines)))


# -- fairseq command lines (the CLI tests) ----------------------------------------------------

BIN = Path(sys.executable).parent
TRAIN = ["--optimizer", "adam", "--lr", "2e-3", "--max-tokens", "2048", "--cpu", "--seed", "1",
         "--log-format", "simple", "--log-interval", "5", "--no-epoch-checkpoints", "--num-workers", "0"]
LM_TASK = ["--task", "language_modeling", "--tokens-per-sample", "64", *LM_ARCH]
MT_TASK = ["--task", "translation", "--share-all-embeddings", *MT_ARCH,
           "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1"]


def run(tool: str, *args: str, ok: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([str(BIN / tool), *map(str, args)], capture_output=True, text=True, env=env, input=stdin, timeout=600)
    if ok and proc.returncode != 0:
        raise AssertionError(f"{tool} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc
