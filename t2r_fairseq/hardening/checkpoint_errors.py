"""Checkpoint loading that is safe, and whose failures are one line naming the file, the cause and the fix.

fairseq 0.12 reads checkpoints with torch's default unpickler settings and lets whatever goes wrong surface
from deep inside torch or its own wrappers: a text file as ``IndexError: pop from empty list``, a truncated
copy as a zip error without a path, a malicious pickle with torch's advice to retry with
``weights_only=False`` (which would run it), a directory passed to ``--finetune-from-model`` as a run that
silently trains from scratch, another dictionary as a multi-line ``size mismatch`` list, and our own
:class:`~t2r_fairseq.conversion.swap.SwapError` buried under ``Cannot load model parameters from checkpoint``. Each
wrapper here is applied to one fairseq entry point (once, by the plugin's patch table, :mod:`t2r_fairseq.registry`)
so that the last line the user sees says what the file is and what to do.
"""

from __future__ import annotations

import io
import os
import pickletools
import re
import types
import zipfile
from typing import Any, Callable, List

import torch

from t2r_fairseq.hardening.fairseq_compat import SAFE_FAIRSEQ_GLOBALS


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


def safe_loading_torch(original: Any) -> types.ModuleType:
    """``fairseq.checkpoint_utils.torch``: torch whose ``load`` always loads safely (:class:`_SafeLoadingTorch`).

    Replaced outright, not wrapped (it is a module): fairseq_compat refuses, at import, a torch too old to load
    fairseq's configs safely, so safe loading is always possible.
    """
    return _SafeLoadingTorch("torch")


def name_the_file(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``fairseq.checkpoint_utils.load_checkpoint_to_cpu``: say, in one line naming the file, why it is unreadable.

    A foreign or truncated file otherwise surfaces as a bare ``IndexError`` or
    ``UnpicklingError`` from deep inside torch, with no path, or with torch's
    advice to retry with ``weights_only=False`` (which runs a malicious file's
    code). The function is looked up through the module by the trainer,
    ``load_model_ensemble`` and the hub; the error is raised ``from None`` so
    torch's advice is not printed, and the line keeps what the file is
    (:func:`describe_unreadable_checkpoint`).
    """

    def load_checkpoint_to_cpu(path: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(path, *args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as exc:
            if not os.path.exists(path):
                raise
            raise CheckpointReadError(describe_unreadable_checkpoint(path, exc)) from None

    return load_checkpoint_to_cpu


def refuse_directories(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``fairseq.checkpoint_utils.load_checkpoint``: ``--finetune-from-model DIR`` / ``--restore-file DIR`` is
    an error instead of training from scratch.

    fairseq checks ``--finetune-from-model`` with ``exists`` (true for a
    directory), and the trainer then finds no *file* there, logs "No existing
    checkpoint found" and starts from random weights: a finetuning run that
    silently is not one. ``fairseq-train`` calls the function through the module.
    """

    def load_checkpoint(cfg: Any, trainer: Any, **passthrough_args: Any) -> Any:
        for path in (getattr(cfg, "finetune_from_model", None), getattr(cfg, "restore_file", None)):
            if path and os.path.isdir(path):
                raise CheckpointReadError(
                    f"cannot read checkpoint {path}: it is a directory -- pass the checkpoint file inside it "
                    "(checkpoint_*.pt)"
                )
        return original(cfg, trainer, **passthrough_args)

    return load_checkpoint


class DictionaryMismatchError(ValueError):
    """A checkpoint's vocabulary size differs from the dictionary the model was built with."""


_VOCABULARY_TENSOR = re.compile(r"(^|\.)(embed_tokens\.weight|output_projection\.weight)$")


def check_vocabulary(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``BaseFairseqModel.load_state_dict``: say "the dictionary does not match" instead of torch's multi-line
    ``size mismatch`` list.

    ``fairseq-generate`` / ``fairseq-eval-lm`` build the model from the data
    directory's ``dict*.txt`` and then load the checkpoint; with another
    dictionary the embeddings differ in their first dimension only. T2R models
    say so in their own loader (:mod:`t2r_fairseq.conversion.swap`); this covers fairseq's
    models (the softmax teachers, the top-k models). :func:`name_data_directory` adds the data directory.
    """

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
        return original(self, state_dict, *args, **kwargs)

    return load_state_dict


def name_data_directory(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``checkpoint_utils.load_model_ensemble_and_task``: a :class:`DictionaryMismatchError` names the
    checkpoint and the data directory whose dictionary does not fit it."""

    def load_model_ensemble_and_task(filenames: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(filenames, *args, **kwargs)
        except DictionaryMismatchError as exc:
            task = kwargs.get("task", args[1] if len(args) > 1 else None)
            data = (getattr(getattr(task, "cfg", None), "data", None)
                    or getattr(getattr(task, "args", None), "data", None))
            where = f"checkpoint {', '.join(map(str, filenames))}" + (f" with data directory {data}" if data else "")
            raise DictionaryMismatchError(f"{where}: {exc}") from None

    return load_model_ensemble_and_task


def surface(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``Trainer.load_checkpoint``: a :class:`~t2r_fairseq.conversion.swap.SwapError` is the last line
    ``fairseq-train`` prints.

    fairseq's ``Trainer.load_checkpoint`` turns any error of the model's load
    into ``Exception: Cannot load model parameters from checkpoint ...; please
    ensure that the architectures match``, so the line that names the cause and
    the fix ends up ~20 lines above the end of a chained traceback. When the
    error it raises was caused by a ``SwapError``, that error is re-raised alone
    (``from None``, its own traceback kept), with the checkpoint's path in place
    of the ``CHECKPOINT`` placeholder of its hints. Any other error passes
    through unchanged.
    """
    from t2r_fairseq.conversion.swap import SwapError

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

    return load_checkpoint
