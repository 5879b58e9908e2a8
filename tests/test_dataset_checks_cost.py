"""The dataset check's cost is bounded whatever the split's size.

The check runs on every split fairseq loads, in every process, for any task once the plugin is imported. By default
it reads the index's header and last entry and a bounded sample of the ``.bin`` (never the whole split, never the
index's whole size array); ``T2R_FULL_DATASET_CHECK=1`` makes it read everything. The damaged-data cases that
name the file through ``fairseq-train`` are in test_hostile_input.py (their splits are smaller than the sample,
so the sample is the whole file there).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fairseq.data import Dictionary, indexed_dataset

from t2r_fairseq.hardening import dataset_checks
from t2r_fairseq.hardening.dataset_checks import (
    FULL_CHECK_ENV, SAMPLE_BLOCK_TOKENS, SAMPLE_BLOCKS, DatasetFileError, check_binarised_dataset, sample_ranges,
)

SENTENCES, LENGTH = 3000, 40  # 120k tokens: about twice the sample bound
BAD = 1000  # a token id beyond the 30-entry dictionary


def _dictionary() -> Dictionary:
    d = Dictionary()
    for i in range(26):
        d.add_symbol(f"w{i}")
    return d


def _unsampled_position(tokens: int) -> int:
    """A token position in the middle of the split that the default check does not read."""
    middle = tokens // 2
    for pos in range(middle, tokens):
        if not any(start <= pos < start + count for start, count in sample_ranges(tokens)):
            return pos
    raise AssertionError("the sample covers the second half of the split")


def _write_split(prefix: Path, bad_at: int | None) -> None:
    """A mmap split of SENTENCES x LENGTH in-dictionary token ids, with id BAD at token position ``bad_at``."""
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 30, size=SENTENCES * LENGTH)
    if bad_at is not None:
        ids[bad_at] = BAD
    builder = indexed_dataset.MMapIndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for sentence in ids.reshape(SENTENCES, LENGTH):
        builder.add_item(torch.from_numpy(sentence.astype(np.int64)))
    builder.finalize(str(prefix) + ".idx")


@pytest.fixture
def reads(monkeypatch):
    """Every numpy read of a file: ``(path, bytes)``; a memory map counts as its whole file."""
    log: list[tuple[str, int]] = []
    fromfile, memmap = np.fromfile, np.memmap

    def counted_fromfile(file, dtype=float, count=-1, *args, **kwargs):
        out = fromfile(file, dtype, count, *args, **kwargs)
        log.append((str(file), out.nbytes))
        return out

    def counted_memmap(file, *args, **kwargs):
        out = memmap(file, *args, **kwargs)
        log.append((str(file), out.nbytes))
        return out

    monkeypatch.setattr(np, "fromfile", counted_fromfile)
    monkeypatch.setattr(np, "memmap", counted_memmap)
    monkeypatch.delenv(FULL_CHECK_ENV, raising=False)
    return log


def test_default_check_reads_a_bounded_sample_and_misses_a_mid_split_id(tmp_path, reads):
    tokens = SENTENCES * LENGTH
    assert tokens > SAMPLE_BLOCKS * SAMPLE_BLOCK_TOKENS
    prefix = tmp_path / "train"
    _write_split(prefix, _unsampled_position(tokens))
    check_binarised_dataset(str(prefix), _dictionary())  # a sample: the id in the middle is not seen
    bin_bytes = sum(n for path, n in reads if path.endswith(".bin"))
    assert 0 < bin_bytes <= SAMPLE_BLOCKS * SAMPLE_BLOCK_TOKENS * 2 < (prefix.with_suffix(".bin")).stat().st_size
    assert not [path for path, _ in reads if path.endswith(".idx")]  # header and last entry only: no size array


@pytest.mark.parametrize("how", ["env", "argument"])
def test_full_check_is_opt_in_and_reads_every_token(tmp_path, reads, monkeypatch, how):
    tokens = SENTENCES * LENGTH
    prefix = tmp_path / "train"
    _write_split(prefix, _unsampled_position(tokens))
    kwargs = {}
    if how == "env":
        monkeypatch.setenv(FULL_CHECK_ENV, "1")
    else:
        kwargs["full"] = True
    with pytest.raises(DatasetFileError, match=rf"^dataset .*train\.bin holds token id {BAD}, but the dictionary has "
                                               r"30 entries: the data was binarised with another dictionary -- "):
        check_binarised_dataset(str(prefix), _dictionary(), **kwargs)
    assert sum(n for path, n in reads if path.endswith(".bin")) == tokens * 2


@pytest.mark.parametrize("where", ["first", "last"])
def test_default_sample_holds_the_first_and_last_sentences(tmp_path, reads, where):
    tokens = SENTENCES * LENGTH
    prefix = tmp_path / "train"
    _write_split(prefix, 3 if where == "first" else tokens - 5)
    with pytest.raises(DatasetFileError, match=rf"holds token id {BAD}, but the dictionary has 30 entries"):
        check_binarised_dataset(str(prefix), _dictionary())


def test_sample_ranges_are_bounded_and_span_the_split():
    assert sample_ranges(0) == [] and sample_ranges(100) == [(0, 100)]
    ranges = sample_ranges(10**9)
    assert len(ranges) == SAMPLE_BLOCKS and all(count == SAMPLE_BLOCK_TOKENS for _, count in ranges)
    assert ranges[0][0] == 0 and ranges[-1][0] + SAMPLE_BLOCK_TOKENS == 10**9
    assert all(a[0] + a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))  # disjoint, in order


def test_full_check_names_an_index_whose_sizes_and_pointers_disagree(tmp_path, reads):
    """Only the exhaustive check sums the sizes; the default trusts the last entry (fairseq wrote both)."""
    prefix = tmp_path / "train"
    _write_split(prefix, None)
    idx = prefix.with_suffix(".idx")
    raw = bytearray(idx.read_bytes())
    raw[26:30] = np.int32(LENGTH + 1).tobytes()  # the first sentence's size, one token too many
    idx.write_bytes(bytes(raw))
    check_binarised_dataset(str(prefix), _dictionary())
    with pytest.raises(DatasetFileError, match=r"^dataset index .*train\.idx is inconsistent: its sizes add up to "
                                               rf"{SENTENCES * LENGTH + 1} tokens but its last pointer and size end at "
                                               rf"token {SENTENCES * LENGTH} -- re-run fairseq-preprocess"):
        check_binarised_dataset(str(prefix), _dictionary(), full=True)
    assert dataset_checks.full_check_requested() is False
