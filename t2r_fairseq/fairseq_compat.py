"""Small compatibility fixes for fairseq 0.12 on current torch and numpy, applied at import.

Let torch >= 2.6's safe checkpoint loading read fairseq checkpoints.

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True``, which only
unpickles allow-listed types. fairseq checkpoints store their training
configuration next to the weights, and for legacy (argparse) models that
includes an ``argparse.Namespace``; without an allow-list ``fairseq-generate``
fails with ``Unsupported global: argparse.Namespace``. We allow-list exactly
the plain-data classes fairseq writes, keeping safe loading on for everything
else, instead of turning it off globally.
"""

from __future__ import annotations

import argparse
import collections
import functools
import io
import os
import pickletools
import re
import struct
import types
import zipfile
from typing import Any, List

import torch

SAFE_FAIRSEQ_GLOBALS: List[Any] = [argparse.Namespace, collections.OrderedDict]


def _omegaconf_globals() -> List[Any]:
    """The plain-data omegaconf classes of a checkpoint state as fairseq holds it in memory.

    In multi-process training, rank 0 reads the checkpoint (``--finetune-from-model`` or a resume),
    fairseq turns its ``cfg`` into an omegaconf ``DictConfig`` and broadcasts the whole state to the
    other ranks with ``torch.save`` / ``torch.load``, which is a safe load too (tensors travel separately,
    replaced by fairseq's ``_TensorPlaceholder``); without these the other ranks fail with
    ``Unsupported global: omegaconf.dictconfig.DictConfig``.
    """
    import typing

    from fairseq.distributed.utils import _TensorPlaceholder
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode

    return [DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, typing.Any, collections.defaultdict,
            dict, list, int, _TensorPlaceholder]


def allow_fairseq_checkpoint_globals() -> None:
    """Register fairseq's config types with torch's safe unpickler (idempotent)."""
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:  # torch < 2.4 loads pickles unrestricted anyway
        add(SAFE_FAIRSEQ_GLOBALS + _omegaconf_globals())


class CheckpointReadError(RuntimeError):
    """A checkpoint file exists but cannot be read; the message names the file."""


ZIP_MAGIC = b"PK\x03\x04"  # torch >= 1.6 checkpoints are zip archives
PICKLE_MAGIC = b"\x80"  # pickle protocol >= 2: torch's legacy format, or a plain pickle
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _pickle_globals(data: bytes, limit: int = 4) -> List[str]:
    """``module.name`` of every global the pickle(s) in ``data`` reference, read without unpickling.

    ``pickletools.genops`` only decodes opcodes, so nothing in the file runs.
    Torch's legacy format is several pickles in a row (magic number, protocol,
    system info, the object), hence up to ``limit`` of them.
    """
    found: List[str] = []
    stream = io.BytesIO(data)
    for _ in range(limit):
        strings: List[str] = []
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if isinstance(arg, str):
                    strings.append(arg)
                if op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
        except Exception:  # noqa: BLE001 - a damaged pickle: report what was found before the damage
            break
        if stream.tell() >= len(data):
            break
    return found


_WEIGHTS_ONLY_FAILURE = "Weights only load failed"


def _allowed_global_names() -> set:
    """``module.name`` of the globals safe loading accepts (torch's own types are matched by prefix)."""
    getter = getattr(torch.serialization, "get_safe_globals", lambda: [])
    names = {"collections.OrderedDict", "builtins.set", "_codecs.encode"}
    for g in list(getter()) + SAFE_FAIRSEQ_GLOBALS:
        g = g[0] if isinstance(g, tuple) else g
        names.add(f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', getattr(g, '__name__', g))}")
    return names


def _weights_only_detail(exc: BaseException) -> str:
    """The lines of torch's weights-only error that say what was refused, without its advice."""
    advice = ("weights_only", "Weights only", "Check the documentation", "Please file an issue", "WeightsUnpickler")
    lines = [l.strip() for l in str(exc).splitlines() if l.strip() and not any(a in l for a in advice)]
    return "; ".join(lines) or "the file holds objects safe loading does not accept"


def describe_unreadable_checkpoint(path: str, exc: BaseException) -> str:
    """One line saying what ``path`` is instead of a checkpoint, and what to do, from its bytes and ``exc``.

    torch's own messages are either bare (``IndexError: pop from empty list``
    for a text file) or advise re-running with ``weights_only=False``, which
    would execute whatever a malicious pickle contains. This never does.
    """
    if os.path.isdir(path):
        return f"cannot read checkpoint {path}: it is a directory -- pass the checkpoint file inside it (checkpoint_*.pt)"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if size == 0:
        return f"cannot read checkpoint {path}: the file is empty (0 bytes) -- re-copy it, or pass another checkpoint"
    if _WEIGHTS_ONLY_FAILURE in str(exc):
        refused = _REFUSED_GLOBAL.search(str(exc))
        names = [refused.group(1)] if refused is not None else []
        if not names and head.startswith(PICKLE_MAGIC):  # torch stopped before naming one (e.g. at a FRAME opcode)
            with open(path, "rb") as f:
                allowed = _allowed_global_names()
                names = [n for n in _pickle_globals(f.read()) if n not in allowed and not n.startswith("torch.")]
        why = (
            f"it references the global {names[0]}, which is not allowed in a checkpoint"
            if names else f"{_weights_only_detail(exc)}"
        )
        return (
            f"cannot read checkpoint {path}: refused by safe loading: {why} (only tensors and fairseq's plain "
            "config types are allowed); nothing in it was run -- use a checkpoint written by fairseq-train or the "
            "t2r_fairseq tools"
        )
    if head.startswith(ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                has_pickle = any(n.endswith("/data.pkl") or n == "data.pkl" for n in archive.namelist())
        except zipfile.BadZipFile:
            return (
                f"cannot read checkpoint {path}: a truncated or damaged zip archive ({size} bytes, its directory at "
                "the end is missing) -- the save or the copy was cut short; re-copy it"
            )
        if not has_pickle:
            return f"cannot read checkpoint {path}: a zip archive but not a torch checkpoint (no data.pkl in it)"
    elif head.startswith(PICKLE_MAGIC):
        with open(path, "rb") as f:
            try:
                for _ in pickletools.genops(f):  # decodes the first pickle's opcodes; runs nothing
                    pass
            except ValueError:  # "pickle exhausted before seeing STOP" (or a cut opcode)
                return f"cannot read checkpoint {path}: a truncated pickle ({size} bytes) -- re-copy it"
    else:
        return (
            f"cannot read checkpoint {path}: not a torch checkpoint -- it starts with {head[:12]!r}, while torch "
            f"files start with {ZIP_MAGIC!r} (zip) or {PICKLE_MAGIC!r} (pickle); pass a checkpoint_*.pt that "
            "fairseq-train wrote"
        )
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (
        f"cannot read checkpoint {path}: a torch file, but not a fairseq checkpoint ({type(exc).__name__}"
        f"{': ' + detail if detail else ''}) -- pass a checkpoint_*.pt that fairseq-train wrote"
    )


def load_torch_file_safely(path: str) -> Any:
    """``torch.load`` with safe loading always on (whatever the torch default or environment), errors in one line.

    For tools that read a checkpoint's raw state (no fairseq upgrade); raises
    :class:`CheckpointReadError` with :func:`describe_unreadable_checkpoint`'s line.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointReadError(describe_unreadable_checkpoint(path, exc)) from None


class _SafeLoadingTorch(types.ModuleType):
    """``torch`` as fairseq's ``checkpoint_utils`` sees it: ``load`` always passes ``weights_only=True``.

    fairseq calls ``torch.load(f, map_location=...)`` and so relies on torch's
    default, which is unsafe before torch 2.6 and whenever the environment sets
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``; an explicit argument wins over both.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return torch.load(f, *args, **kwargs)


def name_path_in_checkpoint_errors() -> None:
    """Make fairseq's checkpoint reader load safely and say, in one line naming the file, why a file is unreadable.

    A foreign or truncated file otherwise surfaces as a bare ``IndexError`` or
    ``UnpicklingError`` from deep inside torch, with no path, or with torch's
    advice to retry with ``weights_only=False`` (which runs a malicious file's
    code). We wrap ``fairseq.checkpoint_utils.load_checkpoint_to_cpu`` (looked
    up through the module by the trainer, ``load_model_ensemble`` and the hub)
    once; the error is raised ``from None`` so torch's advice is not printed,
    and the line keeps what the file is (:func:`describe_unreadable_checkpoint`).
    """
    from fairseq import checkpoint_utils

    if getattr(torch.serialization, "add_safe_globals", None) is not None:  # else fairseq configs cannot load safely
        checkpoint_utils.torch = _SafeLoadingTorch("torch")  # type: ignore[attr-defined]
    original = checkpoint_utils.load_checkpoint_to_cpu
    if getattr(original, "_t2r_wrapped", False):
        return

    @functools.wraps(original)
    def load_checkpoint_to_cpu(path: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(path, *args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as exc:
            if not os.path.exists(path):
                raise
            raise CheckpointReadError(describe_unreadable_checkpoint(path, exc)) from None

    load_checkpoint_to_cpu._t2r_wrapped = True  # type: ignore[attr-defined]
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu


HELP_FLAGS = ("-h", "--help")


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """fairseq's help with each option's default appended, unless its help already speaks of one (or it has none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or "default" in text.lower() or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def _show_model_defaults(parser: argparse.ArgumentParser, input_args: List[str]) -> None:
    """Give the model options of ``--arch`` their effective defaults, for the help only.

    fairseq adds model options without defaults (``argparse.SUPPRESS``) so that
    the ``--arch`` preset fills them after parsing; the values a run would get
    are the preset's, then the model dataclass's, which is what is shown.
    """
    import dataclasses

    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_NAME_REGISTRY, MODEL_DATACLASS_REGISTRY

    arch = next((a.split("=", 1)[1] for a in input_args if a.startswith("--arch=")), None)
    for flag in ("--arch", "-a"):
        if arch is None and flag in input_args[:-1]:
            arch = input_args[input_args.index(flag) + 1]
    if arch not in ARCH_CONFIG_REGISTRY:
        return
    defaults = argparse.Namespace()
    try:
        ARCH_CONFIG_REGISTRY[arch](defaults)
    except Exception:  # noqa: BLE001 - a preset that needs more than defaults: show what the dataclass says
        defaults = argparse.Namespace()
    model = ARCH_MODEL_NAME_REGISTRY.get(arch)
    if model in MODEL_DATACLASS_REGISTRY:
        for f in dataclasses.fields(MODEL_DATACLASS_REGISTRY[model]):
            if not hasattr(defaults, f.name) and f.default is not dataclasses.MISSING:
                setattr(defaults, f.name, f.default)
    for action in parser._actions:
        if action.default is argparse.SUPPRESS and hasattr(defaults, action.dest):
            value = getattr(defaults, action.dest)
            action.default = value if isinstance(value, (bool, int, float, str)) or value is None else str(value)


def _help_after_all_options(parse_args_and_arch: Any, parser: Any, input_args: Any, modify_parser: Any) -> None:
    """Run fairseq's ``parse_args_and_arch`` without the help flag and print the help once every option is added.

    fairseq calls ``modify_parser`` twice: before its first parse and after it
    has added the model's, task's, criterion's (...) options. The second call is
    the moment the parser is complete, so the help is printed there.
    """
    calls = 0

    def print_complete_help(p: Any) -> None:
        nonlocal calls
        calls += 1
        if modify_parser is not None:
            modify_parser(p)
        if calls == 2:
            _show_model_defaults(p, input_args)
            p.formatter_class = _DefaultsHelpFormatter
            p.print_help()
            p.exit()

    args = [a for a in input_args if a not in HELP_FLAGS]
    parse_args_and_arch(parser, input_args=args, parse_known=True, modify_parser=print_complete_help)


def complete_fairseq_help() -> None:
    """Make ``fairseq-train ... --arch A --criterion C --help`` list A's and C's options, with defaults and help.

    fairseq 0.12's ``options.parse_args_and_arch`` parses the command line once
    to learn ``--arch``/``--task``/``--criterion``, then adds their options and
    parses again; ``--help`` is acted on in that first parse, so the help never
    shows model, task or criterion options (fairseq's own models' neither). The
    user directory is imported inside that same call, just before the first
    parse, so this import is the one moment a plugin can act: if the call in
    progress asked for help, we find its parser and arguments on the stack, run
    fairseq's function again without the help flag, and print the help when
    every option is in. Later calls in the process go through a wrapper that
    does the same. Nothing changes for a command line without ``-h``/``--help``.
    """
    import sys

    from fairseq import options

    original = getattr(options.parse_args_and_arch, "_t2r_original", options.parse_args_and_arch)
    if not getattr(options.parse_args_and_arch, "_t2r_wrapped", False):

        @functools.wraps(original)
        def parse_args_and_arch(parser: Any, input_args: Any = None, parse_known: bool = False,
                                suppress_defaults: bool = False, modify_parser: Any = None) -> Any:
            given = sys.argv[1:] if input_args is None else list(input_args)
            if any(a in HELP_FLAGS for a in given) and not suppress_defaults:
                _help_after_all_options(original, parser, given, modify_parser)
            return original(parser, input_args, parse_known, suppress_defaults, modify_parser)

        parse_args_and_arch._t2r_wrapped = True  # type: ignore[attr-defined]
        parse_args_and_arch._t2r_original = original  # type: ignore[attr-defined]
        options.parse_args_and_arch = parse_args_and_arch

    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not original.__code__:
        frame = frame.f_back
    if frame is None:
        return
    local = frame.f_locals
    given = sys.argv[1:] if local.get("input_args") is None else list(local["input_args"])
    if any(a in HELP_FLAGS for a in given):
        _help_after_all_options(original, local["parser"], given, local.get("modify_parser"))


def refuse_directories_as_checkpoints() -> None:
    """Make ``--finetune-from-model DIR`` / ``--restore-file DIR`` an error instead of training from scratch.

    fairseq checks ``--finetune-from-model`` with ``exists`` (true for a
    directory), and the trainer then finds no *file* there, logs "No existing
    checkpoint found" and starts from random weights: a finetuning run that
    silently is not one. We wrap ``fairseq.checkpoint_utils.load_checkpoint``
    (called through the module by ``fairseq-train``) once.
    """
    from fairseq import checkpoint_utils

    original = checkpoint_utils.load_checkpoint
    if getattr(original, "_t2r_dirs_refused", False):
        return

    @functools.wraps(original)
    def load_checkpoint(cfg: Any, trainer: Any, **passthrough_args: Any) -> Any:
        for path in (getattr(cfg, "finetune_from_model", None), getattr(cfg, "restore_file", None)):
            if path and os.path.isdir(path):
                raise CheckpointReadError(
                    f"cannot read checkpoint {path}: it is a directory -- pass the checkpoint file inside it "
                    "(checkpoint_*.pt)"
                )
        return original(cfg, trainer, **passthrough_args)

    load_checkpoint._t2r_dirs_refused = True  # type: ignore[attr-defined]
    checkpoint_utils.load_checkpoint = load_checkpoint


class DictionaryMismatchError(ValueError):
    """A checkpoint's vocabulary size differs from the dictionary the model was built with."""


_VOCABULARY_TENSOR = re.compile(r"(^|\.)(embed_tokens\.weight|output_projection\.weight)$")


def name_dictionary_in_vocabulary_mismatches() -> None:
    """Say "the dictionary does not match" instead of torch's multi-line ``size mismatch`` list.

    ``fairseq-generate`` / ``fairseq-eval-lm`` build the model from the data
    directory's ``dict*.txt`` and then load the checkpoint; with another
    dictionary the embeddings differ in their first dimension only. T2R models
    say so in their own loader (:mod:`t2r_fairseq.swap`); this covers fairseq's
    models (the softmax teachers, the top-k models), wrapping
    ``BaseFairseqModel.load_state_dict`` and, to name the data directory,
    ``checkpoint_utils.load_model_ensemble_and_task`` (once each).
    """
    from fairseq import checkpoint_utils
    from fairseq.models import BaseFairseqModel

    original_load = BaseFairseqModel.load_state_dict
    if not getattr(original_load, "_t2r_wrapped", False):

        @functools.wraps(original_load)
        def load_state_dict(self: Any, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
            own = self.state_dict()
            for name, tensor in state_dict.items():
                mine = own.get(name)
                if (_VOCABULARY_TENSOR.search(name) and mine is not None and tensor.dim() == mine.dim() == 2
                        and tensor.shape[1:] == mine.shape[1:] and tensor.shape[0] != mine.shape[0]):
                    raise DictionaryMismatchError(
                        f"the checkpoint's vocabulary has {tensor.shape[0]} entries ({name}) but this model's "
                        f"dictionary has {mine.shape[0]}: the dictionary is not the one the checkpoint was trained "
                        "with -- use the data directory (dict*.txt) it was trained with"
                    )
            return original_load(self, state_dict, *args, **kwargs)

        load_state_dict._t2r_wrapped = True  # type: ignore[attr-defined]
        BaseFairseqModel.load_state_dict = load_state_dict

    original_ensemble = checkpoint_utils.load_model_ensemble_and_task
    if getattr(original_ensemble, "_t2r_wrapped", False):
        return

    @functools.wraps(original_ensemble)
    def load_model_ensemble_and_task(filenames: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original_ensemble(filenames, *args, **kwargs)
        except DictionaryMismatchError as exc:
            task = kwargs.get("task", args[1] if len(args) > 1 else None)
            data = getattr(getattr(task, "cfg", None), "data", None) or getattr(getattr(task, "args", None), "data", None)
            where = f"checkpoint {', '.join(map(str, filenames))}" + (f" with data directory {data}" if data else "")
            raise DictionaryMismatchError(f"{where}: {exc}") from None

    load_model_ensemble_and_task._t2r_wrapped = True  # type: ignore[attr-defined]
    checkpoint_utils.load_model_ensemble_and_task = load_model_ensemble_and_task


class DatasetFileError(ValueError):
    """A binarised dataset file is empty, truncated, or does not fit the dictionary; the message names the file."""


_MMAP_MAGIC = b"MMIDIDX\x00\x00"
_MMAP_HEADER = 9 + 8 + 1 + 8  # magic, version, dtype code, number of sentences
_MMAP_DTYPES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 8, 8: 2, 9: 4, 10: 8}  # fairseq's dtype code -> bytes
_REBINARISE = "re-run fairseq-preprocess for this split (a copy or a preprocessing run was cut short)"


def check_binarised_dataset(prefix: str, dictionary: Any = None) -> None:
    """Check ``prefix.idx`` / ``prefix.bin`` (fairseq's mmap format) against each other and ``dictionary``.

    fairseq reads the index header with bare ``assert``s and maps the data
    lazily, so an empty index surfaces as "Dataset not found", a truncated one
    as a ``struct``/``numpy`` error, a truncated ``.bin`` as a numpy error inside
    the first training step (after ``crash.pt`` is written), and token ids beyond
    the dictionary as an embedding ``IndexError`` there. Reading the header, the
    two sizes and the largest token id costs one pass over the data, once.
    Other formats (raw, lazy, cached) are left to fairseq.
    """
    import numpy as np

    idx, binary = prefix + ".idx", prefix + ".bin"
    has_idx, has_bin = os.path.isfile(idx), os.path.isfile(binary)
    if has_idx != has_bin:
        present, absent = (idx, binary) if has_idx else (binary, idx)
        raise DatasetFileError(f"dataset {present} exists but {absent} is missing -- {_REBINARISE}")
    if not has_idx:
        return
    idx_size, bin_size = os.path.getsize(idx), os.path.getsize(binary)
    if idx_size == 0:
        raise DatasetFileError(f"dataset index {idx} is empty (0 bytes) -- {_REBINARISE}")
    with open(idx, "rb") as f:
        header = f.read(_MMAP_HEADER)
    if not header.startswith(_MMAP_MAGIC[:8]):
        return  # another fairseq format (or none): fairseq's own loader decides
    if len(header) < _MMAP_HEADER:
        raise DatasetFileError(
            f"dataset index {idx} is truncated ({idx_size} bytes, shorter than its {_MMAP_HEADER}-byte header) "
            f"-- {_REBINARISE}"
        )
    (version,) = struct.unpack("<Q", header[9:17])
    itemsize = _MMAP_DTYPES.get(header[17])
    (count,) = struct.unpack("<Q", header[18:26])
    if version != 1 or itemsize is None:
        raise DatasetFileError(
            f"dataset index {idx} has an unknown header (version {version}, dtype code {header[17]}) -- {_REBINARISE}"
        )
    expected = _MMAP_HEADER + 12 * count  # int32 sizes and int64 pointers per sentence
    if idx_size != expected:
        raise DatasetFileError(
            f"dataset index {idx} is {'truncated' if idx_size < expected else 'longer than its header says'}: "
            f"{idx_size} bytes, while its header's {count} sentences take {expected} -- {_REBINARISE}"
        )
    if count == 0:
        raise DatasetFileError(f"dataset {prefix} holds no sentences -- binarise a non-empty text for this split")
    sizes = np.fromfile(idx, dtype=np.int32, count=count, offset=_MMAP_HEADER)
    tokens = int(sizes.astype(np.int64).sum())
    if bin_size != tokens * itemsize:
        raise DatasetFileError(
            f"dataset file {binary} is {'truncated' if bin_size < tokens * itemsize else 'longer than its index says'}"
            f": {bin_size} bytes, while {idx} lists {tokens} tokens of {itemsize} bytes ({tokens * itemsize}) "
            f"-- {_REBINARISE}"
        )
    if dictionary is not None and tokens:
        dtype = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float64,
                 8: np.uint16, 9: np.uint32, 10: np.uint64}[header[17]]
        largest = int(np.memmap(binary, dtype=dtype, mode="r").max())
        if largest >= len(dictionary):
            raise DatasetFileError(
                f"dataset {binary} holds token id {largest}, but the dictionary has {len(dictionary)} entries: the "
                "data was binarised with another dictionary -- use the dict*.txt written with this data, or "
                "re-run fairseq-preprocess with --srcdict/--tgtdict set to this one"
            )


def check_datasets_when_loaded() -> None:
    """Run :func:`check_binarised_dataset` on every split a fairseq task loads (once; idempotent).

    The tasks call ``fairseq.data.data_utils.load_indexed_dataset`` through the
    module, so wrapping it there covers language modelling and translation
    (and fairseq's other tasks) in ``fairseq-train``, ``-generate``, ``-eval-lm``.
    """
    from fairseq.data import data_utils

    original = data_utils.load_indexed_dataset
    if getattr(original, "_t2r_wrapped", False):
        return

    @functools.wraps(original)
    def load_indexed_dataset(path: str, dictionary: Any = None, *args: Any, **kwargs: Any) -> Any:
        if isinstance(path, str) and os.path.exists(os.path.dirname(path) or "."):
            check_binarised_dataset(path, dictionary)
        return original(path, dictionary, *args, **kwargs)

    load_indexed_dataset._t2r_wrapped = True  # type: ignore[attr-defined]
    data_utils.load_indexed_dataset = load_indexed_dataset


def restore_numpy_compat_long() -> None:
    """fairseq 0.12 still spells ``np.compat.long`` (removed in numpy 2) in
    ``TokenBlockDataset`` for ``break_mode="eos"``, the mode the hub interface
    (``from_pretrained(...).generate``) and ``--sample-break-mode eos`` use. We add
    back exactly that alias (``int``, as numpy 1 defined it) when it is missing.
    """
    import numpy as np

    if not hasattr(np, "compat"):
        import types

        np.compat = types.SimpleNamespace(long=int)  # type: ignore[attr-defined]


def surface_swap_errors_in_trainer() -> None:
    """Let a :class:`~t2r_fairseq.swap.SwapError` be the last line ``fairseq-train`` prints.

    fairseq's ``Trainer.load_checkpoint`` turns any error of the model's load
    into ``Exception: Cannot load model parameters from checkpoint ...; please
    ensure that the architectures match``, so the line that names the cause and
    the fix ends up ~20 lines above the end of a chained traceback. We wrap the
    method once: when the error it raises was caused by a ``SwapError``, that
    error is re-raised alone (``from None``, its own traceback kept), with the
    checkpoint's path in place of the ``CHECKPOINT`` placeholder of its hints.
    Any other error passes through unchanged.
    """
    from fairseq.trainer import Trainer

    from t2r_fairseq.swap import SwapError

    original = Trainer.load_checkpoint
    if getattr(original, "_t2r_wrapped", False):
        return

    @functools.wraps(original)
    def load_checkpoint(self: Any, filename: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, filename, *args, **kwargs)
        except Exception as exc:
            cause: Any = exc
            while cause is not None and not isinstance(cause, SwapError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise cause.for_checkpoint(filename).with_traceback(cause.__traceback__) from None

    load_checkpoint._t2r_wrapped = True  # type: ignore[attr-defined]
    Trainer.load_checkpoint = load_checkpoint  # type: ignore[method-assign]
