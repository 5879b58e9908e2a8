"""The plugin's second wing: fairseq 0.12 made safe and legible, for every model in the process.

Importing ``t2r_fairseq`` (``--user-dir``) patches fairseq where it would otherwise fail or mislead, each patch
applied once (:mod:`.patching`); the modules hold the wrappers, :data:`t2r_fairseq.registry.PATCHES` says which
fairseq function each one wraps:

* :mod:`.fairseq_compat` -- checkpoints load under torch's safe (``weights_only``) unpickler and only under it
  (torch >= 2.4, refused at import otherwise); the one numpy alias fairseq still uses is restored;
* :mod:`.checkpoint_errors` -- a checkpoint that cannot be read, a directory given as a checkpoint, another
  dictionary, a swap that does not fit: one last line naming the file, the cause and the fix;
* :mod:`.checkpoint_files` -- fairseq's copies (``checkpoint_last.pt``, ``checkpoint_best.pt``) are atomic;
* :mod:`.dataset_checks` -- binarised splits are checked against their dictionary when loaded;
* :mod:`.fairseq_help` -- ``--help`` lists the options of the chosen model, task and criterion.

:func:`t2r_fairseq.registry.install` is the one place they are applied. ``T2R_FAIRSEQ_UNPATCHED=1`` in the
environment (:func:`unpatched`) leaves every fairseq function as fairseq wrote it: no safe-loading wrapper, error
rewording, atomic copies, dataset check or ``--help`` completion. Kept whatever the switch: the two compatibility shims without which fairseq 0.12 does not
run on this stack at all (its config types registered with torch's safe unpickler, the default since torch 2.6;
numpy 2's removed ``np.compat.long``), and the plugin's own models, criterion and ``--feature-map-lr-scale``.
"""

from __future__ import annotations

import os

from t2r_fairseq.hardening import fairseq_compat  # noqa: F401  (the torch floor is checked at import, always)

SWITCH = "T2R_FAIRSEQ_UNPATCHED"


def unpatched() -> bool:
    """True when the environment asks to leave fairseq as it is (``T2R_FAIRSEQ_UNPATCHED`` set, not ``0``)."""
    return os.environ.get(SWITCH, "").strip() not in ("", "0")
