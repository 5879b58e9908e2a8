"""Carried-state scoring (``--carry-state``): blocks with carried state score exactly as one pass over the stream.

Fast tier: tiny T2R LMs built in-process (default feature map, the paper's tied map, the sliding-window hybrid),
per-token log-probabilities of a stream cut into blocks of several sizes against one pass, and the refusals that
need no process. Slow tier: ``fairseq-eval-lm`` on the session's tiny corpus, blockwise against carried state
against one pass over the whole split, and the command-line refusals (their last line).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from fairseq.data import Dictionary, MonolingualDataset, TokenBlockDataset
from fairseq.data.data_utils import numpy_seed

from helpers import LM_TASK, TRAIN, USER_DIR, build_lm, random_tokens, run
from t2r_fairseq.hardening.model_overrides import refuse_foreign_options
from t2r_fairseq.models.carried_state import (
    CarriedStateError,
    StreamOrderDataset,
    carry_state_option,
    check_stream_scoring,
)
from t2r_fairseq.models.option_checks import OptionError

STREAM = 150


def _log_probs(model, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of every vocabulary entry at every position, ``[1, T, V]`` (each scored token's
    included)."""
    return model.get_normalized_probs(model(tokens), log_probs=True)


def _blocks(model, tokens: torch.Tensor, size: int) -> torch.Tensor:
    return torch.cat([_log_probs(model, tokens[:, i:i + size]) for i in range(0, tokens.size(1), size)], dim=1)


@pytest.mark.parametrize("extra", [
    [],  # the default feature map (t2r_qk)
    ["--feature-map", "t2r"],  # the paper's
    ["--sliding-window", "5"],  # the hybrid: ring buffer + (S, z) carried
], ids=["t2r_qk", "t2r", "sliding_window"])
def test_carried_blocks_equal_one_pass(tmp_path: Path, extra: list) -> None:
    """Per-token log-probabilities of the stream in blocks of 64, 50 (ragged last block), 7 (several chunks of
    --linear-chunk-size 8 cut mid-chunk) and 1 token equal one pass, float32, within 1e-5; blockwise scoring
    (the option off) does not, so the test sees the carried context."""
    _, task, model = build_lm(tmp_path, extra=["--linear-chunk-size", "8", *extra])
    tokens = random_tokens(task.target_dictionary, 1, STREAM, seed=1)
    with torch.no_grad():
        full = _log_probs(model, tokens)
        blockwise = _blocks(model, tokens, 50)
        assert (blockwise - full).abs().max() > 1e-3
        model.decoder.set_carry_state(True)
        for size in (64, 50, 7, 1):
            model.reset_carried_state()
            carried = _blocks(model, tokens, size)
            torch.testing.assert_close(carried, full, rtol=0, atol=1e-5, msg=f"blocks of {size}")
            assert model.decoder.carried_positions == STREAM


def test_option_from_the_command_line_and_state_reset(tmp_path: Path) -> None:
    """--carry-state builds a carrying model; train() and reset_carried_state() start a new stream, eval() does
    not (fairseq's scorer calls model.eval() before every batch)."""
    _, task, model = build_lm(tmp_path, extra=["--carry-state"])
    assert model.decoder.carry_state and getattr(task, "t2r_carry_state")
    tokens = random_tokens(task.target_dictionary, 1, 40, seed=2)
    with torch.no_grad():
        first = _log_probs(model, tokens)
        model.eval()
        assert model.decoder.carried_positions == 40
        second = _log_probs(model, tokens)  # continues the stream: another context, other scores
        assert (second - first).abs().max() > 1e-4
        model.train()
        model.eval()
        assert model.decoder.carried_positions == 0
        torch.testing.assert_close(_log_probs(model, tokens), first, rtol=0, atol=1e-6)
        model.reset_carried_state()
        torch.testing.assert_close(_log_probs(model, tokens), first, rtol=0, atol=1e-6)


def test_off_by_default_is_blockwise(tmp_path: Path) -> None:
    _, task, model = build_lm(tmp_path)
    tokens = random_tokens(task.target_dictionary, 1, 40, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(_log_probs(model, tokens), _log_probs(model, tokens), rtol=0, atol=0)
    assert not model.decoder.carry_state and not getattr(task, "t2r_carry_state", False)


def test_refusals_in_process(tmp_path: Path) -> None:
    """Training mode, several rows, a learned positional embedding, a non-bool value: one line each."""
    _, task, model = build_lm(tmp_path, extra=["--carry-state"])
    tokens = random_tokens(task.target_dictionary, 2, 16, seed=3)
    with pytest.raises(CarriedStateError, match=r"this batch has 2 rows .*--batch-size 1"):
        model(tokens)
    model.train()
    with pytest.raises(CarriedStateError, match=r"model is training .*train without --carry-state"):
        model(tokens[:1])
    with pytest.raises(CarriedStateError, match=r"learned positional embedding .* score this model blockwise"):
        build_lm(tmp_path / "learned", extra=["--carry-state", "--decoder-learned-pos"])
    with pytest.raises(CarriedStateError, match=r"must be True or False, got 'yes'"):
        carry_state_option(type("Args", (), {"carry_state": "yes"})())
    # no positions at all: nothing to continue, accepted
    _, _, plain = build_lm(tmp_path / "nopos", extra=["--carry-state", "--no-token-positional-embeddings"])
    assert plain.decoder.carry_state


def test_foreign_checkpoints_refuse_the_override() -> None:
    """fairseq drops an override key a checkpoint's config lacks: carry_state on a softmax LM or a translation
    model is refused by name instead of silently scoring blockwise."""
    from omegaconf import OmegaConf

    for name in ("transformer_lm", "t2r_transformer", "topk_transformer_lm"):
        with pytest.raises(OptionError, match=rf"only t2r_transformer_lm models have it .* model is {name}"):
            refuse_foreign_options({"carry_state": True}, OmegaConf.create({"_name": name}))
    refuse_foreign_options({"carry_state": True}, OmegaConf.create({"_name": "t2r_transformer_lm_gpt"}))
    refuse_foreign_options({"carry_state": False}, OmegaConf.create({"_name": "transformer_lm"}))


def _token_blocks(tmp_path: Path) -> tuple[Dictionary, MonolingualDataset]:
    d = Dictionary()
    for i in range(10):
        d.add_symbol(f"w{i}")
    stream = [torch.tensor([d.index(f"w{(i * 7 + j) % 10}") for j in range(n)] + [d.eos()]) for i, n in
              enumerate([9, 30, 4, 17, 22, 8, 40])]
    blocks = TokenBlockDataset(stream, [len(s) for s in stream], block_size=16, pad=d.pad(), eos=d.eos(),
                               break_mode="none", include_targets=True)
    return d, MonolingualDataset(blocks, blocks.sizes, d, d, add_eos_for_other_targets=False, shuffle=True,
                                 targets=["future"])


def test_stream_order_and_dataloader_checks(tmp_path: Path) -> None:
    """fairseq's LM dataset orders blocks by size with random ties; the wrapper restores stream order, and the
    loader's checks name the fix for whatever would break the stream."""
    d, dataset = _token_blocks(tmp_path)
    with numpy_seed(1):
        assert list(dataset.ordered_indices()) != list(range(len(dataset)))
    assert list(StreamOrderDataset(dataset).ordered_indices()) == list(range(len(dataset)))
    task = type("Task", (), {"args": type("Args", (), {"add_bos_token": False})()})()
    check_stream_scoring(task, dataset, 1, 1024, 1, 0)
    for kwargs, message in [
        ({"batch_size": None}, r"--batch-size 1 \(got --max-tokens batching\)"),
        ({"batch_size": 4}, r"--batch-size 1 \(got --batch-size 4\)"),
        ({"context_window": 32}, r"--context-window 32 .* drop --context-window"),
        ({"num_shards": 2}, r"sharded over 2 workers"),
        ({"max_positions": 8}, r"a block of 16 tokens exceeds the model's 8 positions"),
    ]:
        call = {"batch_size": 1, "max_positions": 1024, "num_shards": 1, "context_window": 0, **kwargs}
        with pytest.raises(CarriedStateError, match=message):
            check_stream_scoring(task, dataset, **call)
    task.args.add_bos_token = True
    with pytest.raises(CarriedStateError, match=r"--add-bos-token"):
        check_stream_scoring(task, dataset, 1, 1024, 1, 0)


# -- fairseq-eval-lm ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_carry(work: Path) -> Path:
    """A T2R LM swapped from the session's softmax teacher and finetuned a few updates (its own directory)."""
    save = work / "lm-t2r-carry"
    run("fairseq-train", work / "bin-lm", "--user-dir", USER_DIR, *LM_TASK, "--arch", "t2r_transformer_lm",
        "--feature-size", "8", *TRAIN, "--max-update", "5", "--save-dir", save,
        "--finetune-from-model", work / "lm-teacher" / "checkpoint_last.pt")
    return save / "checkpoint_last.pt"


def _eval_lm(work: Path, checkpoint: Path, *args: str, ok: bool = True):
    return run("fairseq-eval-lm", work / "bin-lm", "--user-dir", USER_DIR, "--path", checkpoint, "--cpu",
               "--gen-subset", "test", "--num-workers", "0", *args, ok=ok)


def _loss(proc) -> tuple[float, float, int]:
    out = proc.stdout + proc.stderr
    found = re.search(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+)", out)
    tokens = re.search(r"Evaluated ([\d,]+) tokens", out)
    assert found and tokens, out[-2000:]
    return float(found.group(1)), float(found.group(2)), int(tokens.group(1).replace(",", ""))


def test_eval_lm_blockwise_carried_and_one_pass(work: Path, lm_carry: Path) -> None:
    """The test split in 64-token blocks: blockwise and carried-state perplexity both computed and finite; carried
    state equals fairseq-eval-lm's own blockwise scoring of the whole split as one block (loss to 4 decimals)."""
    blockwise = _loss(_eval_lm(work, lm_carry, "--tokens-per-sample", "64", "--max-tokens", "2048"))
    carried = _loss(_eval_lm(work, lm_carry, "--tokens-per-sample", "64", "--batch-size", "1",
                             "--model-overrides", "{'carry_state': True}"))
    one_pass = _loss(_eval_lm(work, lm_carry, "--tokens-per-sample", "8192", "--batch-size", "1",
                              "--model-overrides", "{'max_target_positions': 8192}"))
    assert blockwise[2] == carried[2] == one_pass[2] > 64 * 4  # the same tokens, several blocks
    assert all(math.isfinite(r[1]) and r[1] > 1 for r in (blockwise, carried, one_pass))
    assert carried[0] == pytest.approx(one_pass[0], abs=2e-4)
    assert carried[0] != pytest.approx(blockwise[0], abs=1e-3)  # the carried context changes the scores


@pytest.mark.parametrize("args, message", [
    (["--max-tokens", "2048"], r"run fairseq-eval-lm with --batch-size 1 \(got --max-tokens batching\)"),
    (["--batch-size", "1", "--context-window", "16"], r"--context-window 16 with carry_state.*drop --context-window"),
], ids=["batches", "context_window"])
def test_eval_lm_refusals(work: Path, lm_carry: Path, args: list, message: str) -> None:
    proc = _eval_lm(work, lm_carry, "--tokens-per-sample", "64", "--model-overrides", "{'carry_state': True}",
                    *args, ok=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and re.search(message, last), last
    assert "Loss (base 2)" not in proc.stdout + proc.stderr


def test_eval_lm_softmax_checkpoint_refuses_carry_state(work: Path) -> None:
    """fairseq itself would drop the unknown key and score blockwise; the plugin names the model instead."""
    proc = _eval_lm(work, work / "lm-teacher" / "checkpoint_last.pt", "--tokens-per-sample", "64",
                    "--batch-size", "1", "--model-overrides", "{'carry_state': True}", ok=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "only t2r_transformer_lm models have it" in last and "transformer_lm" in last, last
