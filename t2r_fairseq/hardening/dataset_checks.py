"""Binarised datasets checked when fairseq loads them: one line naming the file, before anything is trained.

fairseq reads the index header of its mmap format with bare ``assert``s and maps the data lazily, so a damaged
split fails late and obscurely (see :func:`check_binarised_dataset`); :func:`check_first` runs
the check on every split a task loads, in every process that loads it (each training worker, each
``fairseq-generate`` / ``-eval-lm``).

Cost. The check runs for every fairseq task once the plugin is imported, on WMT- and WikiText-103-sized splits
(hundreds of millions of tokens), once per split per process, so by default it reads a bounded number of bytes
whatever the split's size: the index header, the index's last size and pointer (which give the ``.bin``'s
length), the two file sizes, and -- for the dictionary check -- a sample of the token ids (the first and last
tokens of the file and evenly spaced blocks in between, :data:`SAMPLE_BLOCKS` blocks of
:data:`SAMPLE_BLOCK_TOKENS` tokens; a split smaller than that is read whole). Data binarised with another
dictionary usually holds out-of-range ids all over (frequent words get small ids, but every sentence has rare
ones), so the sample catches the common mistake; an out-of-range id that occurs only in an unsampled stretch,
or an index whose interior sizes and pointers disagree, is left to fairseq (an embedding ``IndexError`` in the
first step that meets it).

``T2R_FULL_DATASET_CHECK=1`` in the environment makes the check exhaustive: every size of the index is summed
against the ``.bin`` and every token id is compared with the dictionary (one read of the whole split, in every
process -- worth it once after binarising, not on every run).
"""

from __future__ import annotations

import os
import struct
from typing import Any, Callable, Iterator, List, Tuple


FULL_CHECK_ENV = "T2R_FULL_DATASET_CHECK"
SAMPLE_BLOCKS = 16  # contiguous blocks (the first at the file's start, the last at its end): a few seeks
SAMPLE_BLOCK_TOKENS = 4096  # tokens per block: at most 64k token ids (128-256 KiB) read per split by default


class DatasetFileError(ValueError):
    """A binarised dataset file is empty, truncated, or does not fit the dictionary; the message names the file."""


_MMAP_MAGIC = b"MMIDIDX\x00\x00"
_MMAP_HEADER = 9 + 8 + 1 + 8  # magic, version, dtype code, number of sentences
_REBINARISE = "re-run fairseq-preprocess for this split (a copy or a preprocessing run was cut short)"


def full_check_requested() -> bool:
    """Whether ``T2R_FULL_DATASET_CHECK`` asks for the exhaustive check (any value but empty, 0, false, no)."""
    return os.environ.get(FULL_CHECK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def sample_ranges(tokens: int, blocks: int = SAMPLE_BLOCKS, block: int = SAMPLE_BLOCK_TOKENS) -> List[Tuple[int, int]]:
    """``[(first token, count), ...]``: the stretches of a ``tokens``-long ``.bin`` the default check reads.

    The whole file when it is at most ``blocks * block`` tokens; otherwise
    ``blocks`` blocks of ``block`` tokens, evenly spaced from the first token
    to the last, so the file's first and last sentences are always in the sample.
    """
    if tokens <= blocks * block:
        return [(0, tokens)] if tokens else []
    last = tokens - block
    return [(i * last // (blocks - 1), block) for i in range(blocks)]


def _token_ids(binary: str, dtype: Any, ranges: List[Tuple[int, int]]) -> Iterator[Any]:
    """The token ids of ``ranges`` of ``binary``, one numpy array per range, read with plain reads (no mapping)."""
    import numpy as np

    itemsize = np.dtype(dtype).itemsize
    for start, count in ranges:
        yield np.fromfile(binary, dtype=dtype, count=count, offset=start * itemsize)


def check_binarised_dataset(prefix: str, dictionary: Any = None, full: bool | None = None) -> None:
    """Check ``prefix.idx`` / ``prefix.bin`` (fairseq's mmap format) against each other and ``dictionary``.

    fairseq reads the index header with bare ``assert``s and maps the data
    lazily, so an empty index surfaces as "Dataset not found", a truncated one
    as a ``struct``/``numpy`` error, a truncated ``.bin`` as a numpy error inside
    the first training step (after ``crash.pt`` is written), and token ids beyond
    the dictionary as an embedding ``IndexError`` there.

    By default (``full=None`` reads ``T2R_FULL_DATASET_CHECK``, see the module
    docstring) the cost is bounded whatever the split's size: the header, the
    index's length, its last size and pointer against the ``.bin``'s length, and
    the largest id of a *sample* of the tokens (:func:`sample_ranges`) against
    the dictionary. ``full=True`` sums every size and reads every token id.
    Other formats (raw, lazy, cached) are left to fairseq.
    """
    import numpy as np
    from fairseq.data.indexed_dataset import _code_to_dtype  # the header's dtype codes, as fairseq's reader maps them

    if full is None:
        full = full_check_requested()
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
    dtype = _code_to_dtype.get(header[17])
    itemsize = None if dtype is None else np.dtype(dtype).itemsize
    (count,) = struct.unpack("<Q", header[18:26])
    if version != 1 or itemsize is None:
        raise DatasetFileError(
            f"dataset index {idx} has an unknown header (version {version}, dtype code {header[17]}) -- {_REBINARISE}"
        )
    expected = _MMAP_HEADER + 12 * count  # int32 sizes, then int64 byte pointers, per sentence
    if idx_size != expected:
        raise DatasetFileError(
            f"dataset index {idx} is {'truncated' if idx_size < expected else 'longer than its header says'}: "
            f"{idx_size} bytes, while its header's {count} sentences take {expected} -- {_REBINARISE}"
        )
    if count == 0:
        raise DatasetFileError(f"dataset {prefix} holds no sentences -- binarise a non-empty text for this split")
    # The last sentence starts at the last pointer (bytes) and holds the last size (tokens): together, the
    # .bin's length as the index describes it, in two reads whatever the number of sentences.
    with open(idx, "rb") as f:
        f.seek(_MMAP_HEADER + 4 * (count - 1))
        (last_size,) = struct.unpack("<i", f.read(4))
        f.seek(_MMAP_HEADER + 4 * count + 8 * (count - 1))
        (last_pointer,) = struct.unpack("<q", f.read(8))
    tokens = last_pointer // itemsize + last_size
    if full:
        sizes = np.fromfile(idx, dtype=np.int32, count=count, offset=_MMAP_HEADER)
        summed = int(sizes.astype(np.int64).sum())
        if summed != tokens or last_pointer % itemsize:
            raise DatasetFileError(
                f"dataset index {idx} is inconsistent: its sizes add up to {summed} tokens but its last pointer "
                f"and size end at token {tokens} -- {_REBINARISE}"
            )
    if bin_size != tokens * itemsize:
        raise DatasetFileError(
            f"dataset file {binary} is {'truncated' if bin_size < tokens * itemsize else 'longer than its index says'}"
            f": {bin_size} bytes, while {idx} lists {tokens} tokens of {itemsize} bytes ({tokens * itemsize}) "
            f"-- {_REBINARISE}"
        )
    if dictionary is not None and tokens > 0:
        if full:
            largest = int(np.memmap(binary, dtype=dtype, mode="r").max())
        else:
            largest = max(int(ids.max()) for ids in _token_ids(binary, dtype, sample_ranges(tokens)) if ids.size)
        if largest >= len(dictionary):
            raise DatasetFileError(
                f"dataset {binary} holds token id {largest}, but the dictionary has {len(dictionary)} entries: the "
                "data was binarised with another dictionary -- use the dict*.txt written with this data, or "
                "re-run fairseq-preprocess with --srcdict/--tgtdict set to this one"
            )


def check_first(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``fairseq.data.data_utils.load_indexed_dataset``: :func:`check_binarised_dataset` on every split a
    fairseq task loads.

    The tasks call the function through the module, so wrapping it there covers language modelling and
    translation (and fairseq's other tasks) in ``fairseq-train``, ``-generate``, ``-eval-lm``.
    """

    def load_indexed_dataset(path: str, dictionary: Any = None, *args: Any, **kwargs: Any) -> Any:
        if isinstance(path, str) and os.path.exists(os.path.dirname(path) or "."):
            check_binarised_dataset(path, dictionary)
        return original(path, dictionary, *args, **kwargs)

    return load_indexed_dataset
