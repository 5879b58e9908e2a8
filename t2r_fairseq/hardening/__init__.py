"""The plugin's second wing: fairseq 0.12 made safe and legible, for every model in the process.

Importing ``t2r_fairseq`` (``--user-dir``) patches fairseq where it would otherwise fail or mislead, each patch
applied once (:mod:`.patching`):

* :mod:`.fairseq_compat` -- checkpoints load under torch's safe (``weights_only``) unpickler and only under it
  (torch >= 2.4, refused at import otherwise); the one numpy alias fairseq still uses is restored;
* :mod:`.checkpoint_errors` -- a checkpoint that cannot be read, a directory given as a checkpoint, another
  dictionary, a swap that does not fit: one last line naming the file, the cause and the fix;
* :mod:`.checkpoint_files` -- fairseq's copies (``checkpoint_last.pt``, ``checkpoint_best.pt``) are atomic;
* :mod:`.dataset_checks` -- binarised splits are checked against their dictionary when loaded;
* :mod:`.fairseq_help` -- ``--help`` lists the options of the chosen model, task and criterion.

:func:`install` is the one place they are applied. ``T2R_FAIRSEQ_UNPATCHED=1`` in the environment leaves every
fairseq function as fairseq wrote it: no safe-loading wrapper, error rewording, atomic copies, dataset check or
``--help`` completion. Kept whatever the switch: the two compatibility shims without which fairseq 0.12 does not
run on this stack at all (its config types registered with torch's safe unpickler, the default since torch 2.6;
numpy 2's removed ``np.compat.long``), and the plugin's own models, criterion and ``--feature-map-lr-scale``.
"""

from __future__ import annotations

import logging
import os

from t2r_fairseq.hardening import fairseq_compat  # noqa: F401  (the torch floor is checked at import, always)

logger = logging.getLogger(__name__)

SWITCH = "T2R_FAIRSEQ_UNPATCHED"


def unpatched() -> bool:
    """True when the environment asks to leave fairseq as it is (``T2R_FAIRSEQ_UNPATCHED`` set, not ``0``)."""
    return os.environ.get(SWITCH, "").strip() not in ("", "0")


def install() -> bool:
    """Apply this wing (each patch once per process); False when :data:`SWITCH` left fairseq's functions alone.

    Call after the plugin's models and criterion are registered: ``--help`` completion may print the help of the
    command line being parsed, which needs all of them.
    """
    from t2r_fairseq.hardening.fairseq_compat import allow_fairseq_checkpoint_globals, restore_numpy_compat_long

    allow_fairseq_checkpoint_globals()
    restore_numpy_compat_long()
    if unpatched():
        logger.info(f"{SWITCH} is set: fairseq's functions are left unpatched")
        return False
    from t2r_fairseq.hardening.checkpoint_errors import (
        name_dictionary_in_vocabulary_mismatches,
        name_path_in_checkpoint_errors,
        refuse_directories_as_checkpoints,
        surface_swap_errors_in_trainer,
    )
    from t2r_fairseq.hardening.checkpoint_files import make_checkpoint_copies_atomic
    from t2r_fairseq.hardening.dataset_checks import check_datasets_when_loaded
    from t2r_fairseq.hardening.fairseq_help import complete_fairseq_help
    from t2r_fairseq.hardening.model_overrides import apply_generation_overrides

    name_path_in_checkpoint_errors()
    apply_generation_overrides()
    check_datasets_when_loaded()
    refuse_directories_as_checkpoints()
    name_dictionary_in_vocabulary_mismatches()
    make_checkpoint_copies_atomic()
    surface_swap_errors_in_trainer()
    complete_fairseq_help()  # last: it may print --help, which needs everything above and every registration
    return True
