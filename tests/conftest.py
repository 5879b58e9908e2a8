"""Session fixtures shared by the CLI-level tests: tiny corpora binarised with fairseq-preprocess and
softmax teachers trained with fairseq-train, built once per test session (once per pytest-xdist worker)."""

from __future__ import annotations

import fcntl
import inspect
import os
import re
import shutil
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from helpers import LM_TASK, MT_TASK, TRAIN, VOCAB, run, write_corpus


if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest.ini starts one worker per core: one thread each, in the worker and in every CLI or recipe it starts,
    # or the workers' thread pools fight over the same cores.
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

# Test files in the order the workers should take them: the longest first, so that no worker is left with a
# long file at the end while the other one idles (seconds per file, `pytest --durations` on 2026-12-08 with two
# workers on a machine busy with other jobs, so read the order, not the seconds: recipes ~870, cli ~650, quickstart
# ~485, resume ~410, rehearsal ~225, calibration ~225, attention_transfer ~140, hostile_input ~140, carry_state ~135,
# topk ~120). The other files follow in collection order. Each file runs whole on one worker (--dist loadfile in
# pytest.ini), so its module fixtures are built once and its tests keep their order (test_cli's hub test reads a
# checkpoint an earlier test writes).
LONGEST_FIRST = ("test_recipes", "test_cli", "test_quickstart", "test_resume", "test_rehearsal", "test_calibration",
                 "test_attention_transfer", "test_hostile_input", "test_carry_state", "test_topk",
                 "test_hybrid_attention", "test_shatter_cli", "test_checkpoint_identity")


# The fast tier (`pytest -m "not slow"`: math, modules, swap, in-process model builds) leaves out every test that
# starts a process -- fairseq's CLIs, the recipes, the tools as commands -- itself or through a fixture it uses
# (directly or transitively). Marked here from the source, so a new CLI test is slow without anyone remembering to
# mark it; a test may also carry @pytest.mark.slow by hand.
_STARTS_A_PROCESS = re.compile(r"(?<![\w.])run\(|subprocess\.|os\.system\(")
_CALL = re.compile(r"(?<![\w.])([A-Za-z_]\w*)\(")
_TESTS = Path(__file__).parent


@lru_cache(maxsize=None)
def _starts_a_process(func, _seen: frozenset = frozenset()) -> bool:
    """``func``'s source starts a process, or calls a function of the test suite that does (helpers included)."""
    try:
        source = inspect.getsource(func)
    except (OSError, TypeError):
        return False
    if _STARTS_A_PROCESS.search(source):
        return True
    names = getattr(func, "__globals__", {})
    for name in set(_CALL.findall(source)) - _seen:
        callee = names.get(name)
        if inspect.isfunction(callee) and Path(inspect.getfile(callee)).parent == _TESTS:
            if _starts_a_process(callee, _seen | {name}):
                return True
    return False


def _is_slow(item: pytest.Item) -> bool:
    if item.get_closest_marker("slow"):
        return True
    if _starts_a_process(getattr(item, "function", None)):
        return True
    definitions = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    return any(_starts_a_process(d.func) for name in item.fixturenames for d in definitions.get(name, ()))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: file order within a file


def _translate(line: str) -> str:
    """A learnable toy 'language pair': reverse the sentence and map each word."""
    return " ".join(VOCAB[(VOCAB.index(w) + 7) % len(VOCAB)] for w in reversed(line.split()))


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    """The tiny corpora and teachers, built once per test run: under pytest-xdist the first worker that needs them
    builds them in the run's shared temporary directory while any other waits on a lock, then every worker reads
    them. A test that writes here uses names no other file uses (test_cli's lm-t2r and mt-t2r, test_carry_state's
    lm-t2r-carry): each file runs whole on one worker."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _build_work(tmp_path_factory.mktemp("cli"))
    root = tmp_path_factory.getbasetemp().parent / "cli-shared"
    with open(f"{root}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (root / "DONE").exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            _build_work(root)
            (root / "DONE").touch()
    return root


def _build_work(root: Path) -> Path:
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
