"""Hostile input: every bad option, file or data set stops the run with one last line that names it, writes nothing,
and a malicious checkpoint executes nothing, on every loading path.

Each case is a real command (``fairseq-train``, ``fairseq-eval-lm``, ``fairseq-generate``, the tools) with its own
exit code and stderr. To keep the file fast on one core, the commands run in children forked from one process that
has already imported fairseq, torch and t2r_fairseq (a "zygote"), instead of paying the ~7 s interpreter and import
start-up ~30 times; a fork is a separate process, so side effects, exit codes and stderr are the real ones. One
test runs the real console script, for the one behaviour that depends on the import order (``--help``).
"""

from __future__ import annotations

import os
import pickle
import random
import re
import runpy
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pytest
import torch

from helpers import BIN, LM_ARCH, USER_DIR, VOCAB

import t2r_fairseq  # noqa: F401  (imported before forking: the children start with everything loaded)
import fairseq_cli.eval_lm
import fairseq_cli.generate
import fairseq_cli.preprocess
import fairseq_cli.train
from t2r_fairseq.tools import arch_flags, attention_gap, convert, to_topk  # noqa: F401  (imports, as above)

TRAIN = ["--optimizer", "adam", "--lr", "2e-3", "--max-tokens", "1024", "--cpu", "--seed", "1", "--log-format",
         "simple", "--no-epoch-checkpoints", "--num-workers", "0", "--required-batch-size-multiple", "1"]
LM = ["--task", "language_modeling", "--tokens-per-sample", "32", *LM_ARCH]

ENTRY: dict[str, Callable[[], object]] = {
    "fairseq-preprocess": fairseq_cli.preprocess.cli_main,
    "fairseq-train": fairseq_cli.train.cli_main,
    "fairseq-eval-lm": fairseq_cli.eval_lm.cli_main,
    "fairseq-generate": fairseq_cli.generate.cli_main,
}


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def last_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""


def forked(tool: str, *args: object, tmp: Path) -> Result:
    """Run ``tool`` (a fairseq console script, ``python -m MODULE`` or ``python -c CODE``) in a forked child.

    The child behaves as the interpreter would: an uncaught exception prints its traceback to stderr and exits 1,
    ``sys.exit(msg)`` prints ``msg`` and exits 1.
    """
    argv = [str(a) for a in args]
    out, err = tmp / f"fork{os.getpid()}_{random.getrandbits(32)}.out", None
    err = out.with_suffix(".err")
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            fo, fe = os.open(out, os.O_WRONLY | os.O_CREAT), os.open(err, os.O_WRONLY | os.O_CREAT)
            os.dup2(fo, 1), os.dup2(fe, 2)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            try:
                if tool == "python" and argv[0] == "-m":
                    sys.argv = [argv[1], *argv[2:]]
                    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
                elif tool == "python" and argv[0] == "-c":
                    sys.argv = ["-c", *argv[2:]]
                    exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
                else:
                    sys.argv = [str(BIN / tool), *argv]
                    ENTRY[tool]()
                code = 0
            except SystemExit as e:
                if e.code is None:
                    code = 0
                elif isinstance(e.code, int):
                    code = e.code
                else:
                    print(e.code, file=sys.stderr)
                    code = 1
            except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
                traceback.print_exc()
                code = 1
            sys.stdout.flush(), sys.stderr.flush()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return Result(os.waitstatus_to_exitcode(status), out.read_text(), err.read_text())


def _write_corpus(path: Path, lines: int, seed: int, vocab: Sequence[str] = VOCAB) -> None:
    rng = random.Random(seed)
    path.write_text("".join(" ".join(rng.choice(vocab) for _ in range(rng.randint(4, 12))) + "\n" for _ in range(lines)))


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    """A binarised toy LM corpus (``bin``), a softmax teacher trained on it for 3 updates (``teacher.pt``) and its
    swap into T2R (``t2r.pt``)."""
    root = tmp_path_factory.mktemp("hostile")
    for split, n, seed in [("train", 200, 1), ("valid", 40, 2), ("test", 40, 3)]:
        _write_corpus(root / f"lm.{split}", n, seed)
    r = forked("fairseq-preprocess", "--only-source", "--trainpref", root / "lm.train", "--validpref", root / "lm.valid",
               "--testpref", root / "lm.test", "--destdir", root / "bin", "--workers", "1", tmp=root)
    assert r.returncode == 0, r.stderr[-2000:]
    r = forked("fairseq-train", root / "bin", *LM, "--arch", "transformer_lm", *TRAIN, "--max-update", "3",
               "--save-dir", root / "teacher", tmp=root)
    assert r.returncode == 0, r.stderr[-2000:]
    (root / "teacher" / "checkpoint_last.pt").rename(root / "teacher.pt")
    for f in (root / "teacher").glob("*.pt"):
        f.unlink()
    r = forked("python", "-m", "t2r_fairseq.tools.convert", root / "teacher.pt", root / "t2r.pt", "--data", root / "bin",
               "--calibrate-steps", "0", "--feature-size", "4", tmp=root)  # the swap alone: a T2R checkpoint
    assert r.returncode == 0, r.stderr[-2000:]
    return root


def _assert_refused(r: Result, save_dir: Path | None, *patterns: str) -> None:
    """Non-zero exit, the last stderr line matches every pattern, and no checkpoint was written."""
    assert r.returncode != 0, r.stdout[-1500:] + r.stderr[-1500:]
    for pattern in patterns:
        assert re.search(pattern, r.last_line), f"{pattern!r} not in the last line:\n{r.stderr[-3000:]}"
    assert "weights_only=False" not in r.stderr and "will likely succeed" not in r.stderr, r.stderr[-3000:]
    if save_dir is not None:
        assert not list(save_dir.rglob("*.pt")), f"written despite the error: {list(save_dir.rglob('*.pt'))}"


def _t2r_train(lm: Path, save: Path, *extra: object, tmp: Path) -> Result:
    return forked("fairseq-train", lm / "bin", "--user-dir", USER_DIR, *LM, "--arch", "t2r_transformer_lm", *TRAIN,
                  "--max-update", "2", "--save-dir", save, *extra, tmp=tmp)


# -- 3. options are checked when the model / criterion is built -------------------------------------------------------

OPTION_CASES = [
    (["--linear-chunk-size", "0"], r"T2ROptionError: --linear-chunk-size must be an integer >= 1 .*got 0"),
    (["--linear-eps", "-1"], r"T2ROptionError: --linear-eps must be a finite number > 0 .*got -1"),
    (["--linear-eps", "nan"], r"--linear-eps must be a finite number > 0 .*got nan"),
    (["--feature-size", "0"], r"T2ROptionError: --feature-size must be an integer >= 1 .*got 0"),
    (["--feature-map-lr-scale", "0"], r"--feature-map-lr-scale must be a finite number > 0 .*got 0"),
    (["--feature-map-lr-scale", "inf"], r"--feature-map-lr-scale must be a finite number > 0 .*got inf"),
    (["--sliding-window", "-1"], r"--sliding-window must be an integer >= 0 .*got -1"),
    (["--criterion", "t2r_attention_transfer", "--transfer-weight", "-1"],
     r"TransferOptionError: --transfer-weight must be a finite number >= 0 .*got -1"),
    (["--criterion", "t2r_attention_transfer", "--transfer-weight-end", "nan"],
     r"--transfer-weight-end must be a finite number >= 0 .*got nan"),
    (["--criterion", "t2r_attention_transfer", "--transfer-only-updates", "-5"],
     r"--transfer-only-updates must be an integer >= 0, got -5"),
    (["--criterion", "t2r_attention_transfer", "--distill-weight", "1.5"],
     r"TransferOptionError: --distill-weight must be in \[0, 1\] .*got 1.5"),
    (["--criterion", "t2r_attention_transfer", "--label-smoothing", "1.5"],
     r"--label-smoothing must be in \[0, 1\) .*got 1.5"),
]


@pytest.mark.parametrize("flags,pattern", OPTION_CASES, ids=[" ".join(c[0][-2:]) for c in OPTION_CASES])
def test_bad_option_fails_at_build_naming_it(lm, tmp_path, flags, pattern):
    r = _t2r_train(lm, tmp_path / "save", *flags, "--finetune-from-model", lm / "teacher.pt", tmp=tmp_path)
    _assert_refused(r, tmp_path, pattern)
    assert "num_updates" not in r.stdout + r.stderr


def test_cross_feature_size_is_checked_for_translation():
    from t2r_fairseq.models.config import T2ROptionError, validate_t2r_options
    from argparse import Namespace

    with pytest.raises(T2ROptionError, match=r"--cross-feature-size must be an integer >= 1 .*got 0"):
        validate_t2r_options(Namespace(cross_feature_size=0))
    with pytest.raises(T2ROptionError, match=r"--linear-kernel must be one of auto, torch, fla, got 'cuda'"):
        validate_t2r_options(Namespace(linear_kernel="cuda"))
    validate_t2r_options(Namespace(feature_map="elu", feature_size=0))  # elu has no feature size


# -- 4. and the malicious checkpoint: what a file is, in one line; nothing executed ------------------------------------


class _Payload:
    """Unpickling this runs ``open(MARKER, 'w')``: the marker file existing afterwards means code was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious(path: Path, marker: Path, legacy: bool = False) -> Path:
    state = {"model": {"decoder.embed_tokens.weight": torch.zeros(2, 2)}, "args": None, "cfg": _Payload(marker)}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


REFUSED = r"cannot read checkpoint .*: refused by safe loading: it references the global (io|builtins)\.open, which is " \
          r"not allowed in a checkpoint .*nothing in it was run -- use a checkpoint written by fairseq-train"


def _loading_paths(lm: Path, bad: Path, save: Path) -> dict[str, tuple]:
    data, teacher = lm / "bin", lm / "teacher.pt"
    hub = (f"from t2r_fairseq.models.t2r_transformer_lm import T2RTransformerLanguageModel as M\n"
           f"M.from_pretrained({str(bad.parent)!r}, {bad.name!r}, {str(data)!r})\n")
    return {
        "finetune-from-model": ("fairseq-train", data, "--user-dir", USER_DIR, *LM, "--arch", "t2r_transformer_lm",
                                *TRAIN, "--max-update", "2", "--save-dir", save, "--finetune-from-model", bad),
        "restore-file": ("fairseq-train", data, "--user-dir", USER_DIR, *LM, "--arch", "t2r_transformer_lm", *TRAIN,
                         "--max-update", "2", "--save-dir", save, "--restore-file", bad, "--reset-optimizer",
                         "--reset-dataloader", "--reset-meters", "--reset-lr-scheduler"),
        "transfer-teacher": ("fairseq-train", data, "--user-dir", USER_DIR, *LM, "--arch", "t2r_transformer_lm",
                             *TRAIN, "--max-update", "2", "--save-dir", save, "--finetune-from-model", teacher,
                             "--criterion", "t2r_attention_transfer", "--transfer-teacher", bad),
        "eval-lm": ("fairseq-eval-lm", data, "--user-dir", USER_DIR, "--path", bad, "--cpu", "--max-tokens", "1024",
                    "--tokens-per-sample", "32"),
        "generate": ("fairseq-generate", data, "--user-dir", USER_DIR, "--task", "language_modeling", "--path", bad,
                     "--cpu", "--max-tokens", "1024", "--tokens-per-sample", "32"),
        "hub": ("python", "-c", hub),
        "convert": ("python", "-m", "t2r_fairseq.tools.convert", bad, save / "out.pt", "--data", data),
        "arch_flags": ("python", "-m", "t2r_fairseq.tools.arch_flags", bad),
        "attention_gap": ("python", "-m", "t2r_fairseq.tools.attention_gap", data, "--path", bad, "--teacher",
                          teacher, "--cpu"),
        "attention_gap_teacher": ("python", "-m", "t2r_fairseq.tools.attention_gap", data, "--path",
                                  lm / "t2r.pt", "--teacher", bad, "--cpu"),
        "to_topk": ("python", "-m", "t2r_fairseq.tools.to_topk", bad, save / "out.pt"),
    }


LOADING_PATHS = ["finetune-from-model", "restore-file", "transfer-teacher", "eval-lm", "generate", "hub", "convert",
                 "arch_flags", "attention_gap", "attention_gap_teacher", "to_topk"]


@pytest.mark.parametrize("where", LOADING_PATHS)
def test_malicious_checkpoint_is_refused_on_every_loading_path(lm, tmp_path, where):
    marker = tmp_path / "PWNED"
    bad = _malicious(tmp_path / "evil.pt", marker, legacy=where in ("eval-lm", "to_topk"))
    tool, *args = _loading_paths(lm, bad, tmp_path / "save")[where]
    r = forked(tool, *args, tmp=tmp_path)
    assert not marker.exists(), "the checkpoint's code was executed"
    _assert_refused(r, tmp_path / "save", REFUSED)


def test_plain_pickle_payload_is_refused_and_named(lm, tmp_path):
    marker = tmp_path / "PWNED"
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({"model": _Payload(marker)}, protocol=4))  # torch stops at opcode FRAME, unnamed
    r = forked("fairseq-eval-lm", lm / "bin", "--user-dir", USER_DIR, "--path", bad, "--cpu", tmp=tmp_path)
    assert not marker.exists()
    _assert_refused(r, tmp_path, r"refused by safe loading: it references the global (io|builtins)\.open")


UNREADABLE = {
    "text": (lambda p, t: p.write_text("this is not a checkpoint\n"),
             r"not a torch checkpoint -- it starts with b'this is not ', while torch files start with b'PK\\x03\\x04' "
             r"\(zip\) or b'\\x80' \(pickle\); pass a checkpoint_\*\.pt that fairseq-train wrote"),
    "empty": (lambda p, t: p.write_bytes(b""), r"the file is empty \(0 bytes\) -- re-copy it"),
    "truncated_zip": (lambda p, t: p.write_bytes(t.read_bytes()[: t.stat().st_size // 2]),
                      r"a truncated or damaged zip archive \(\d+ bytes, its directory at the end is missing\) -- the "
                      r"save or the copy was cut short; re-copy it"),
    "truncated_pickle": (lambda p, t: p.write_bytes(pickle.dumps({"a": list(range(100))}, protocol=2)[:60]),
                         r"a truncated pickle \(60 bytes\) -- re-copy it"),
    "not_fairseq": (lambda p, t: torch.save({"weights": torch.zeros(2)}, p),
                    r"a torch file, but not a fairseq checkpoint \(KeyError: .*\) -- pass a checkpoint_\*\.pt"),
    "directory": (lambda p, t: p.mkdir(), r"it is a directory -- pass the checkpoint file inside it"),
}


@pytest.mark.parametrize("kind", list(UNREADABLE))
def test_unreadable_checkpoint_says_what_the_file_is(lm, tmp_path, kind):
    write, pattern = UNREADABLE[kind]
    bad = tmp_path / "model.pt"
    write(bad, lm / "teacher.pt")
    save = tmp_path / "save"
    r = _t2r_train(lm, save, "--finetune-from-model", bad, tmp=tmp_path)
    _assert_refused(r, save, r"^t2r_fairseq\.hardening\.checkpoint_errors\.CheckpointReadError: cannot read checkpoint "
                    + re.escape(str(bad)) + ": " + pattern)
    assert "During handling of the above exception" not in r.stderr  # raised from None: torch's advice is not shown


def test_tools_print_one_line_for_an_unreadable_checkpoint(lm, tmp_path):
    bad = tmp_path / "in" / "notes.pt"
    bad.parent.mkdir()
    bad.write_text("hello\n")
    r = forked("python", "-m", "t2r_fairseq.tools.to_topk", bad, tmp_path / "save" / "out.pt", tmp=tmp_path)
    _assert_refused(r, tmp_path / "save", r"^to_topk: error: cannot read checkpoint .*notes\.pt: not a torch checkpoint")
    assert r.returncode == 2 and "Traceback" not in r.stderr  # one line, no traceback
    r = forked("python", "-m", "t2r_fairseq.tools.arch_flags", bad, tmp=tmp_path)
    _assert_refused(r, None, r"^arch_flags: error: cannot read checkpoint .*notes\.pt: not a torch checkpoint")


def test_safe_loading_holds_when_the_environment_turns_it_off(lm, tmp_path, monkeypatch):
    """``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns torch's default off; fairseq's loads stay safe (explicit flag)."""
    marker = tmp_path / "PWNED"
    (tmp_path / "in").mkdir()
    bad = _malicious(tmp_path / "in" / "evil.pt", marker)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    r = forked("python", "-m", "t2r_fairseq.tools.arch_flags", bad, tmp=tmp_path)
    assert not marker.exists()
    _assert_refused(r, None, REFUSED)
    r = forked("python", "-m", "t2r_fairseq.tools.to_topk", bad, tmp_path / "save" / "out.pt", tmp=tmp_path)
    assert not marker.exists()
    _assert_refused(r, tmp_path / "save", REFUSED)


def test_no_unsafe_torch_load_in_the_package():
    """Every ``torch.load`` in t2r_fairseq passes ``weights_only=True`` (fairseq's own go through the safe proxy)."""
    root = Path(t2r_fairseq.__file__).parent
    for path in root.rglob("*.py"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.search(r"\btorch\.load\(", line.split("#")[0]) and "``" not in line:
                # the argument, or (the safe proxy) the line before it that sets it
                assert "weights_only=True" in line or 'kwargs["weights_only"] = True' in lines[i - 1], \
                    f"{path}:{i + 1}: {line.strip()}"
    from fairseq import checkpoint_utils

    assert checkpoint_utils.torch.load is not torch.load  # the proxy that forces weights_only=True


# -- 6. --help lists the plugin's options ------------------------------------------------------------------------------


def test_help_lists_t2r_options_with_defaults(tmp_path):
    """The real console script: the user dir is imported inside fairseq's parse, where --help used to be handled."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([str(BIN / "fairseq-train"), "--user-dir", USER_DIR, "--task", "language_modeling",
                           "--arch", "t2r_transformer_lm", "--help"], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    help_text = re.sub(r"\s+", " ", proc.stdout)
    for pattern in [r"--feature-size FEATURE_SIZE feature size k of phi .* \(default: 32\)",
                    r"--linear-chunk-size LINEAR_CHUNK_SIZE .* \(default: \d+\)",
                    r"--linear-eps LINEAR_EPS floor of the linear-attention normaliser .* \(default: 0\.01\)",
                    r"--feature-map-lr-scale FEATURE_MAP_LR_SCALE .* \(default: 8\.0\)",
                    r"--sliding-window SLIDING_WINDOW .* \(default: 0\)",
                    r"--decoder-layers DECODER_LAYERS num decoder layers \(default: 6\)",
                    r"--tokens-per-sample TOKENS_PER_SAMPLE"]:
        assert re.search(pattern, help_text), pattern
    assert not list(tmp_path.rglob("*.pt"))


def test_help_lists_translation_and_criterion_options(tmp_path):
    r = forked("fairseq-train", "--user-dir", USER_DIR, "--task", "translation", "--arch",
               "t2r_transformer_iwslt_de_en", "--criterion", "t2r_attention_transfer", "--help", tmp=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    help_text = re.sub(r"\s+", " ", r.stdout)
    for pattern in [r"--cross-feature-size CROSS_FEATURE_SIZE feature size of the encoder-decoder attention",
                    r"--swap-encoder", r"--transfer-weight TRANSFER_WEIGHT .* \(default: 1\.0\)",
                    r"--transfer-teacher TRANSFER_TEACHER", r"--encoder-attention-heads ENCODER_ATTENTION_HEADS "
                    r"encoder: number of attention heads \(default: 4\)", r"--feature-size FEATURE_SIZE"]:
        assert re.search(pattern, help_text), pattern


# -- bad data: empty / truncated binarised splits, data from another dictionary ----------------------------------------


def _copy_data(lm: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in (lm / "bin").iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def _cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


DATA_CASES = {
    "empty_idx": (lambda d: _cut(d / "train.idx", 0), r"DatasetFileError: dataset index .*train\.idx is empty \(0 bytes\)"),
    "truncated_idx": (lambda d: _cut(d / "train.idx", (d / "train.idx").stat().st_size - 7),
                      r"DatasetFileError: dataset index .*train\.idx is truncated: \d+ bytes, while its header's \d+ "
                      r"sentences take \d+"),
    "short_header": (lambda d: _cut(d / "valid.idx", 12),
                     r"dataset index .*valid\.idx is truncated \(12 bytes, shorter than its 26-byte header\)"),
    "empty_bin": (lambda d: _cut(d / "train.bin", 0), r"dataset file .*train\.bin is truncated: 0 bytes, while"),
    "truncated_bin": (lambda d: _cut(d / "train.bin", (d / "train.bin").stat().st_size - 10),
                      r"dataset file .*train\.bin is truncated: \d+ bytes, while .*train\.idx lists \d+ tokens"),
    "missing_bin": (lambda d: (d / "valid.bin").unlink(), r"dataset .*valid\.idx exists but .*valid\.bin is missing"),
    "smaller_dict": (lambda d: (d / "dict.txt").write_text("".join(l + "\n" for l in (d / "dict.txt").read_text()
                                                                    .splitlines()[:8])),
                     r"dataset .*\.bin holds token id \d+, but the dictionary has 12 entries: the data was binarised "
                     r"with another dictionary"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_binarised_data_is_named_before_training(lm, tmp_path, case):
    damage, pattern = DATA_CASES[case]
    data = _copy_data(lm, tmp_path / "data")
    damage(data)
    save = tmp_path / "save"
    r = forked("fairseq-train", data, "--user-dir", USER_DIR, *LM, "--arch", "transformer_lm", *TRAIN,
               "--max-update", "2", "--save-dir", save, tmp=tmp_path)
    _assert_refused(r, save, pattern, r"-- (re-run fairseq-preprocess|use the dict)")


def _with_dict(lm: Path, dest: Path, extra_words: int) -> Path:
    """A copy of the data whose dict.txt has ``extra_words`` more words than the checkpoint's vocabulary."""
    data = _copy_data(lm, dest)
    with (data / "dict.txt").open("a") as f:
        f.write("".join(f"extra{i} 1\n" for i in range(extra_words)))
    return data


@pytest.mark.parametrize("tool", ["fairseq-eval-lm", "fairseq-generate"])
def test_dictionary_larger_than_the_checkpoint_vocabulary_is_named(lm, tmp_path, tool):
    data = _with_dict(lm, tmp_path / "data", 2)
    task = ["--task", "language_modeling"] if tool == "fairseq-generate" else []
    r = forked(tool, data, "--user-dir", USER_DIR, *task, "--path", lm / "teacher.pt", "--cpu", "--max-tokens", "1024",
               "--tokens-per-sample", "32", tmp=tmp_path)
    _assert_refused(r, tmp_path / "data",
                    r"^t2r_fairseq\.hardening\.checkpoint_errors\.DictionaryMismatchError: checkpoint .*teacher\.pt with data "
                    r"directory .*data: the checkpoint's vocabulary has 24 entries \(decoder\.embed_tokens\.weight\) "
                    r"but this model's dictionary has 26: .* -- use the data directory \(dict\*\.txt\) it was trained "
                    r"with")


def test_dictionary_smaller_than_the_checkpoint_vocabulary_is_named(lm, tmp_path):
    """eval-lm loads the model before the data: the checkpoint-vs-dictionary line comes first (fairseq-train, which
    loads the data first, names the .bin whose token ids exceed the dictionary: DATA_CASES['smaller_dict'])."""
    data = _copy_data(lm, tmp_path / "data")
    DATA_CASES["smaller_dict"][0](data)
    r = forked("fairseq-eval-lm", data, "--user-dir", USER_DIR, "--path", lm / "teacher.pt", "--cpu", "--max-tokens",
               "1024", "--tokens-per-sample", "32", tmp=tmp_path)
    _assert_refused(r, tmp_path / "data", r"DictionaryMismatchError: checkpoint .*teacher\.pt with data directory "
                    r".*data: the checkpoint's vocabulary has 24 entries \(decoder\.embed_tokens\.weight\) but this "
                    r"model's dictionary has 12")
