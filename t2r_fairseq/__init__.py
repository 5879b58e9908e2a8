"""t2r-fairseq: finetune pretrained softmax transformers into RNNs (T2R, Kasai et al. 2021).

Use as a fairseq user directory: ``fairseq-train --user-dir t2r_fairseq ...``. Importing it registers the
``t2r_transformer`` and ``t2r_transformer_lm`` models with their architectures, the top-k models
``topk_transformer`` and ``topk_transformer_lm``, and the ``t2r_attention_transfer`` criterion.

The package has two wings beside the attention code (``ops`` -> ``modules`` -> ``models``):

* :mod:`t2r_fairseq.conversion` -- the swap of a softmax checkpoint into a T2R model and the calibration of its
  new tensors;
* :mod:`t2r_fairseq.hardening` -- fairseq 0.12 made safe and legible for every model in the process (safe
  checkpoint loading, one-line errors, atomic checkpoint copies, dataset checks, ``--help``), installed from
  :func:`t2r_fairseq.hardening.install`; ``T2R_FAIRSEQ_UNPATCHED=1`` leaves fairseq's functions as they are.

The modules' earlier top-level paths (``t2r_fairseq.swap``, ``t2r_fairseq.calibration``,
``t2r_fairseq.checkpoint_errors``, ...) remain importable as the same module objects.
"""

import sys

from t2r_fairseq import hardening  # noqa: E402  (first: refuses a torch below the floor before anything else)
from t2r_fairseq.conversion import calibration, swap  # noqa: E402
from t2r_fairseq.hardening import (  # noqa: E402
    checkpoint_errors,
    checkpoint_files,
    dataset_checks,
    fairseq_compat,
    fairseq_help,
    patching,
)

# Old import paths, as the very same module objects (a monkeypatch or isinstance through either path agrees).
for _module in (swap, calibration, checkpoint_errors, checkpoint_files, dataset_checks, fairseq_compat, fairseq_help,
                patching):
    sys.modules.setdefault(f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}", _module)
del _module

from t2r_fairseq.models import t2r_transformer, t2r_transformer_lm  # noqa: E402,F401  (registration)
from t2r_fairseq.models.step_scale import install_in_trainer  # noqa: E402

install_in_trainer()  # --feature-map-lr-scale: the maps' optimizer step is s times the optimizer's
from t2r_fairseq.criterions import attention_transfer  # noqa: E402,F401  (registration)

# Top-k attention (Gupta et al. 2021): models that evaluate a softmax checkpoint with no new tensors.
from t2r_fairseq.models import topk_transformer, topk_transformer_lm  # noqa: E402,F401  (registration)

# Last: --help completion may print the help of the command line being parsed, which needs every model and
# criterion above.
hardening.install()

__version__ = "0.1.0"
