"""Carried-state scoring (``--carry-state``): a T2R LM scores a stream block after block as one pass.

fairseq scores a language model block by block, every block from an empty context (``fairseq-eval-lm``), or with
``--context-window C`` recomputes C tokens of overlap per block. A T2R model is an RNN: the recurrent state
``(S, z)`` of each layer after one block is all that the next block needs of it, so it can carry that state and
the position count from one forward call to the next, at O(1) per token, and the blocks then give exactly the
log-probabilities of one pass over the whole stream.

This module holds what that takes outside the attention itself:

* :func:`carry_state_option`, the option's check, and :func:`check_carried_positions` (a learned positional
  embedding cannot be read past its table, so it is refused when the model is built);
* :func:`offset_positions`, a forward hook that continues a sinusoidal positional embedding from the carried
  offset (fairseq's module always starts a block at position 1);
* :func:`stream_order_dataloader`, the wrapper of ``LanguageModelingTask.eval_lm_dataloader``: a task whose model
  carries state gets its blocks in stream order (fairseq otherwise orders them by size with random ties), one
  per batch, and refuses up front what would break the stream (``--batch-size`` other than 1,
  ``--context-window``, ``--add-bos-token``, sharding, blocks fairseq would skip as too long).

The decoder's part (state, offset, reset) is in :class:`~t2r_fairseq.models.layers.T2RTransformerDecoder`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np
import torch
from fairseq.data import BaseWrapperDataset
from fairseq.modules import SinusoidalPositionalEmbedding
from fairseq.utils import make_positions, safe_getattr
from torch import Tensor, nn

from t2r_fairseq.models.option_checks import OptionError

# Set on the fairseq task by ``T2RTransformerLanguageModel.build_model`` when its model carries state: the task's
# ``eval_lm_dataloader`` then serves the stream in order (the task is the one fairseq-eval-lm builds batches with).
TASK_FLAG = "t2r_carry_state"
OVERRIDE = "{'carry_state': True}"


class CarriedStateError(OptionError):
    """Carried-state scoring cannot run as asked; raised before anything is scored."""


def carry_state_option(args: Any) -> bool:
    """``--carry-state`` (or ``carry_state`` from ``--model-overrides``), checked to be a bool, not cast."""
    value = safe_getattr(args, "carry_state", False)
    value = False if value is None else value
    if not isinstance(value, bool):
        raise CarriedStateError(f"--carry-state must be True or False, got {value!r}")
    return value


def check_carried_positions(embed_positions: Optional[nn.Module]) -> None:
    """Refuse carried state on a positional embedding that cannot continue past a block.

    Carried positions grow with the whole stream (a test split is hundreds of thousands of tokens); fairseq's
    sinusoidal embedding is defined at every position, a learned one only up to its table.
    """
    if embed_positions is None or isinstance(embed_positions, SinusoidalPositionalEmbedding):
        return
    table = getattr(embed_positions, "max_positions", None)
    raise CarriedStateError(
        f"--carry-state continues positions across blocks, beyond this model's learned positional embedding "
        f"({type(embed_positions).__name__}, {table} positions): only sinusoidal positions (the transformer_lm "
        f"default) or --no-token-positional-embeddings can be carried; score this model blockwise"
    )


def _sinusoids(positions: Tensor, dim: int, padding_idx: int) -> Tensor:
    """Rows of ``SinusoidalPositionalEmbedding.get_embedding`` at ``positions`` (any size), computed as fairseq
    computes its table (fp32, on the CPU) so that they equal the table's rows exactly, without a table as long as
    the stream."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float) * -(math.log(10000) / (half - 1)))
    angles = positions.reshape(-1).cpu().float().unsqueeze(1) * freq.unsqueeze(0)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2 == 1:
        emb = torch.cat([emb, torch.zeros(emb.size(0), 1)], dim=1)
    emb[positions.reshape(-1).cpu() == padding_idx] = 0
    return emb.view(*positions.shape, dim)


def offset_positions(offset: int) -> Callable[[nn.Module, tuple, dict, Tensor], Tensor]:
    """A forward hook (``register_forward_hook(..., with_kwargs=True)``) for a sinusoidal positional embedding
    that moves a non-incremental call's positions ``offset`` further: the block's first token is position
    ``offset + 1``, as it is in one pass over the stream. Padding keeps its zero embedding."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
        if offset == 0 or kwargs.get("incremental_state") is not None:
            return output
        tokens = args[0]
        positions = make_positions(tokens, module.padding_idx)
        positions = positions + tokens.ne(module.padding_idx).long() * offset
        return _sinusoids(positions, module.embedding_dim, module.padding_idx).to(output)

    return hook


class StreamOrderDataset(BaseWrapperDataset):
    """The wrapped dataset in index order, which for fairseq's LM datasets is the order of the stream.

    ``MonolingualDataset`` orders its blocks by size with random ties (``shuffle=True`` in the language-modeling
    task); carried state needs block ``i + 1`` right after block ``i``, as ``LMContextWindowDataset`` does too.
    """

    def ordered_indices(self) -> np.ndarray:
        return np.arange(len(self.dataset))


def check_stream_scoring(task: Any, dataset: Any, batch_size: Optional[int], max_positions: Any,
                         num_shards: int, context_window: int) -> None:
    """Refuse, in one line naming the fix, an ``eval_lm_dataloader`` call whose batches would break the stream."""
    if batch_size != 1:
        raise CarriedStateError(
            f"carry_state scores the split as one stream, block after block, one block per batch (the blocks of "
            f"one batch's rows do not follow each other): run fairseq-eval-lm with --batch-size 1 (got "
            f"{'--batch-size ' + str(batch_size) if batch_size is not None else '--max-tokens batching'})"
        )
    if context_window > 0:
        raise CarriedStateError(
            f"--context-window {context_window} with carry_state: the carried state already gives every token the "
            f"whole stream before it, and the window's tokens would be read twice; drop --context-window"
        )
    if safe_getattr(getattr(task, "args", None), "add_bos_token", False):
        raise CarriedStateError(
            "--add-bos-token with carry_state: every block would start with a BOS in the middle of the stream; "
            "drop --add-bos-token or score blockwise"
        )
    if num_shards > 1:
        raise CarriedStateError(
            f"carry_state scores one stream in order, but the split is sharded over {num_shards} workers: run "
            f"fairseq-eval-lm on one worker (--distributed-world-size 1, no --num-shards)"
        )
    sizes = getattr(dataset, "sizes", None)
    if isinstance(max_positions, int) and sizes is not None and len(sizes) and int(np.max(sizes)) > max_positions:
        raise CarriedStateError(
            f"a block of {int(np.max(sizes))} tokens exceeds the model's {max_positions} positions: fairseq would "
            f"skip it and break the stream; lower --tokens-per-sample or use --sample-break-mode none"
        )


def stream_order_dataloader(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``LanguageModelingTask.eval_lm_dataloader``: a task whose model carries state scores in stream order.

    Every other task is left as fairseq serves it. The checks run when the iterator is built, before fairseq-eval-lm
    scores anything.
    """

    def eval_lm_dataloader(self: Any, dataset: Any, max_tokens: Optional[int] = 36000,
                           batch_size: Optional[int] = None, max_positions: Optional[int] = None,
                           num_shards: int = 1, shard_id: int = 0, num_workers: int = 1, data_buffer_size: int = 10,
                           context_window: int = 0) -> Any:
        if getattr(self, TASK_FLAG, False):
            check_stream_scoring(self, dataset, batch_size, max_positions, num_shards, context_window)
            dataset = StreamOrderDataset(dataset)
        return original(self, dataset, max_tokens, batch_size, max_positions, num_shards, shard_id, num_workers,
                        data_buffer_size, context_window)

    return eval_lm_dataloader
