"""The README's, the user-facing docs' and the recipes' evaluation commands score what a user means to score.

Users copy these commands as they are, so a flag they lack is a wrong number in someone's table: a
``fairseq-generate --scoring sacrebleu`` without ``--remove-bpe`` / ``--post-process`` scores BPE pieces (a BLEU
that no paper reports), and without ``--distributed-world-size 1`` fairseq 0.12 evaluates only shard 0 on a
machine with several GPUs -- the README's own pitfall paragraph says so, and its first MT command once did both.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# the docs the README sends users to for commands to copy (the option reference, the paper recipes, troubleshooting);
# docs/RESULTS.md and docs/BENCHMARKS.md are records: their commands are kept as they were run
USER_DOCS = (README, ROOT / "docs" / "OPTIONS.md", ROOT / "docs" / "PAPER.md", ROOT / "docs" / "TROUBLESHOOTING.md")
EVAL_TOOLS = ("fairseq-generate", "fairseq-eval-lm")


def _fenced_commands(text: str) -> list[str]:
    """Every shell command of the README's fenced code blocks, continuation lines joined, comments dropped.

    Prose also names tools in inline code (``fairseq-generate --scoring sacrebleu`` as a description), so only
    fenced blocks and inline spans that name a checkpoint (``--path``, i.e. a runnable command) count.
    """
    commands: list[str] = []
    prose: list[str] = []
    shell: list[str] = []
    fence: str | None = None  # the language of the open fenced block, None outside one
    for line in text.splitlines():
        if line.startswith("```"):
            if fence is None:
                fence = line[3:].strip()
            else:
                if fence in ("", "bash", "sh", "shell"):
                    commands.extend(_shell_commands("\n".join(shell)))
                fence, shell = None, []
        elif fence is None:
            prose.append(line)
        else:
            shell.append(line)
    commands.extend(span for span in re.findall(r"`([^`\n]+)`", "\n".join(prose)) if "--path" in span)
    return commands


def _shell_commands(block: str) -> list[str]:
    """The commands of one shell block: continuation lines joined, ``#`` comments dropped, split at ``&&``."""
    commands = []
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
        line = "" if line.lstrip().startswith("#") else line.split(" #")[0].strip()
        commands.extend(part.strip() for part in line.split("&&") if part.strip())
    return commands


def _tool_commands(tool: str, docs: tuple[Path, ...] = USER_DOCS) -> list[list[str]]:
    """The commands of ``docs`` (default: the README and the user-facing docs) that run ``tool``, as argument lists."""
    found = []
    for doc in docs:
        for command in _fenced_commands(doc.read_text(encoding="utf-8")):
            words = shlex.split(command)
            if words and Path(words[0]).name == tool:
                found.append(words)
    return found


def _scores_bleu(words: list[str]) -> bool:
    return any(w == "--scoring" and nxt in ("sacrebleu", "bleu") for w, nxt in zip(words, words[1:]))


def _removes_subwords(words: list[str]) -> bool:
    return "--remove-bpe" in words or any(w == "--post-process" or w.startswith("--post-process=") for w in words)


def test_readme_has_generate_commands_to_check() -> None:
    """Guard against the checks below passing on nothing (e.g. a changed code-fence style): the README's own
    recommended commands evaluate, and so do the option reference's (top-k)."""
    assert any(_scores_bleu(words) for words in _tool_commands("fairseq-generate", (README,)))
    assert _tool_commands("fairseq-eval-lm", (README,))
    options = (ROOT / "docs" / "OPTIONS.md",)
    assert _tool_commands("fairseq-generate", options) and _tool_commands("fairseq-eval-lm", options)


def test_readme_generate_commands_score_words_not_subword_pieces() -> None:
    bad = [" ".join(words) for words in _tool_commands("fairseq-generate")
           if _scores_bleu(words) and not _removes_subwords(words)]
    assert not bad, (
        "fairseq-generate scores BLEU on BPE pieces; add --remove-bpe (subword-nmt '@@ ' BPE) or "
        f"--post-process sentencepiece: {bad}"
    )


@pytest.mark.parametrize("tool", EVAL_TOOLS)
def test_readme_eval_commands_follow_its_distributed_world_size_advice(tool: str) -> None:
    """The README tells users to pass ``--distributed-world-size 1`` to both tools; its own commands must too."""
    text = " ".join(README.read_text(encoding="utf-8").split())
    assert re.search(r"both tools default to `--distributed-world-size`.*?\(pass `--distributed-world-size 1`\)",
                     text), "the README's advice changed: revisit which commands need --distributed-world-size 1"
    bad = [" ".join(words) for words in _tool_commands(tool)
           if "--distributed-world-size 1" not in " ".join(words)]
    assert not bad, f"{tool} without --distributed-world-size 1 evaluates only shard 0 on a multi-GPU machine: {bad}"


def _recipes_running_generate() -> list[str]:
    """Recipes with a non-comment line that runs (or picks) fairseq-generate; the WMT recipes call lib.sh's."""
    return sorted(p.name for p in (ROOT / "recipes").glob("*.sh")
                  if any("fairseq-generate" in line and not line.lstrip().startswith("#")
                         for line in p.read_text(encoding="utf-8").splitlines()))


@pytest.mark.parametrize("recipe", _recipes_running_generate())
def test_recipes_that_generate_remove_subwords_and_use_one_shard(recipe: str) -> None:
    """Each recipe that runs fairseq-generate states both flags (file-level: the recipes build their argument
    lists in arrays and functions, so a per-call parse would be a shell interpreter)."""
    text = (ROOT / "recipes" / recipe).read_text(encoding="utf-8")
    assert "--distributed-world-size 1" in text, f"recipes/{recipe}: fairseq-generate lacks --distributed-world-size 1"
    assert "--remove-bpe" in text or "--post-process" in text, f"recipes/{recipe}: fairseq-generate scores BPE pieces"
