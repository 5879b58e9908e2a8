"""Checkpoint files that are either complete or absent, even when training is killed while saving.

fairseq 0.12 writes the first checkpoint of a save atomically (``torch_persistent_save`` writes
``NAME.tmp`` and renames it), but then *copies* it to the other names of that save --
``checkpoint_best.pt`` and ``checkpoint_last.pt`` -- with a plain ``shutil.copyfile`` straight into the
destination. A job killed during that copy (``kill -9``, a Slurm time limit, a pre-empted node) leaves a
truncated ``checkpoint_last.pt``, and the next run, which resumes from exactly that file, fails to read it
although a complete checkpoint of the same update lies beside it.

:func:`atomic_for_local_files` makes fairseq's local-file copy write ``DEST.tmp`` and rename it over
``DEST`` (``os.replace`` is atomic on POSIX file systems), so a killed copy leaves the previous
``checkpoint_last.pt`` intact and the run resumes from the previous save. Remote paths (ioPath handlers) keep
fairseq's behaviour.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable



def atomic_copy(src_path: str, dst_path: str) -> bool:
    """Copy ``src_path`` to ``dst_path`` through ``dst_path + '.tmp'`` and an atomic rename."""
    tmp = dst_path + ".tmp"
    try:
        shutil.copyfile(src_path, tmp)
        os.replace(tmp, dst_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return True


def atomic_for_local_files(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``fairseq.file_io.PathManager.copy`` (used by ``checkpoint_utils.save_checkpoint``): local copies are
    :func:`atomic_copy`, remote ones fairseq's."""
    from fairseq.file_io import PathManager

    def copy(src_path: str, dst_path: str, overwrite: bool = False) -> Any:
        if PathManager.path_requires_pathmanager(src_path) or PathManager.path_requires_pathmanager(dst_path):
            return original(src_path, dst_path, overwrite=overwrite)
        return atomic_copy(src_path, dst_path)

    return copy
