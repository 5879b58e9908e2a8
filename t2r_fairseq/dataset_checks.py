"""Binarised datasets checked when fairseq loads them: one line naming the file, before anything is trained.

fairseq reads the index header of its mmap format with bare ``assert``s and maps the data lazily, so a damaged
split fails late and obscurely (see :func:`check_binarised_dataset`); :func:`check_datasets_when_loaded` runs
the check on every split a task loads.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Callable

from t2r_fairseq.patching import patch_once


class DatasetFileError(ValueError):
    """A binarised dataset file is empty, truncated, or does not fit the dictionary; the message names the file."""


_MMAP_MAGIC = b"MMIDIDX\x00\x00"
_MMAP_HEADER = 9 + 8 + 1 + 8  # magic, version, dtype code, number of sentences
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
    from fairseq.data.indexed_dataset import _code_to_dtype  # the header's dtype codes, as fairseq's reader maps them

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
        largest = int(np.memmap(binary, dtype=dtype, mode="r").max())
        if largest >= len(dictionary):
            raise DatasetFileError(
                f"dataset {binary} holds token id {largest}, but the dictionary has {len(dictionary)} entries: the "
                "data was binarised with another dictionary -- use the dict*.txt written with this data, or "
                "re-run fairseq-preprocess with --srcdict/--tgtdict set to this one"
            )


def check_datasets_when_loaded() -> None:
    """Run :func:`check_binarised_dataset` on every split a fairseq task loads.

    The tasks call ``fairseq.data.data_utils.load_indexed_dataset`` through the
    module, so wrapping it there covers language modelling and translation
    (and fairseq's other tasks) in ``fairseq-train``, ``-generate``, ``-eval-lm``.
    """
    from fairseq.data import data_utils

    def check_first(original: Callable[..., Any]) -> Callable[..., Any]:
        def load_indexed_dataset(path: str, dictionary: Any = None, *args: Any, **kwargs: Any) -> Any:
            if isinstance(path, str) and os.path.exists(os.path.dirname(path) or "."):
                check_binarised_dataset(path, dictionary)
            return original(path, dictionary, *args, **kwargs)

        return load_indexed_dataset

    patch_once(data_utils, "load_indexed_dataset", check_first)
