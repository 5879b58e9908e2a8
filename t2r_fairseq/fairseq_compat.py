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


def name_path_in_checkpoint_errors() -> None:
    """Make fairseq's checkpoint reader name the file when unpickling fails.

    A truncated or foreign file otherwise surfaces as a bare ``IndexError`` or
    ``UnpicklingError`` from deep inside torch, with no path. We wrap
    ``fairseq.checkpoint_utils.load_checkpoint_to_cpu`` (looked up through the
    module by the trainer, ``load_model_ensemble`` and the hub) once; the
    original exception stays chained for the details.
    """
    from fairseq import checkpoint_utils

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
            raise CheckpointReadError(
                f"cannot read checkpoint {path}: {type(exc).__name__}: {exc} -- is it a complete fairseq checkpoint? "
                "(re-copy it if it was truncated)"
            ) from exc

    load_checkpoint_to_cpu._t2r_wrapped = True  # type: ignore[attr-defined]
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu


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
