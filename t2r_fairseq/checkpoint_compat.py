"""Let torch >= 2.6's safe checkpoint loading read fairseq checkpoints.

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
from typing import List

import torch

SAFE_FAIRSEQ_GLOBALS: List[type] = [argparse.Namespace, collections.OrderedDict]


def allow_fairseq_checkpoint_globals() -> None:
    """Register fairseq's config types with torch's safe unpickler (idempotent)."""
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:  # torch < 2.4 loads pickles unrestricted anyway
        add(SAFE_FAIRSEQ_GLOBALS)
