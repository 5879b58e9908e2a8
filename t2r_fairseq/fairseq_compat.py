"""Compatibility fixes for fairseq 0.12 on current torch and numpy, applied at import.

* Safe checkpoint loading. Since torch 2.6, ``torch.load`` defaults to
  ``weights_only=True``, which only unpickles allow-listed types. fairseq
  checkpoints store their training configuration next to the weights, and for
  legacy (argparse) models that includes an ``argparse.Namespace``; without an
  allow-list ``fairseq-generate`` fails with ``Unsupported global:
  argparse.Namespace``. We allow-list exactly the plain-data classes fairseq
  writes, keeping safe loading on for everything else, instead of turning it off
  globally (:mod:`t2r_fairseq.checkpoint_errors` then forces it on).
* ``np.compat.long``, removed in numpy 2, still used by fairseq.

The plugin's other adjustments of fairseq each live in their own module:
:mod:`t2r_fairseq.checkpoint_errors`, :mod:`t2r_fairseq.dataset_checks`,
:mod:`t2r_fairseq.fairseq_help`, :mod:`t2r_fairseq.checkpoint_files`.
"""

from __future__ import annotations

import argparse
import collections
import types
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


def restore_numpy_compat_long() -> None:
    """fairseq 0.12 still spells ``np.compat.long`` (removed in numpy 2) in
    ``TokenBlockDataset`` for ``break_mode="eos"``, the mode the hub interface
    (``from_pretrained(...).generate``) and ``--sample-break-mode eos`` use. We add
    back exactly that alias (``int``, as numpy 1 defined it) when it is missing.
    """
    import numpy as np

    if not hasattr(np, "compat"):
        np.compat = types.SimpleNamespace(long=int)  # type: ignore[attr-defined]
