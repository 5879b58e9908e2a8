"""t2r-fairseq: finetune pretrained softmax transformers into RNNs (T2R, Kasai et al. 2021).

Use as a fairseq user directory: ``fairseq-train --user-dir t2r_fairseq ...``.
Importing it registers the ``t2r_transformer`` and ``t2r_transformer_lm``
models with their architectures, the top-k models ``topk_transformer`` and
``topk_transformer_lm``, and the ``t2r_attention_transfer`` criterion, and adjusts fairseq 0.12 where it would
otherwise fail or mislead (:mod:`t2r_fairseq.fairseq_compat`, :mod:`t2r_fairseq.checkpoint_errors`,
:mod:`t2r_fairseq.dataset_checks`, :mod:`t2r_fairseq.fairseq_help`, :mod:`t2r_fairseq.checkpoint_files`): fairseq
checkpoints load under torch's safe (``weights_only``) unpickler and only under it; the one numpy alias fairseq
still uses is restored; a checkpoint-load error of ours is the last line ``fairseq-train`` prints; ``--help``
lists the options of the chosen model, task and criterion; binarised splits are checked when loaded; and
fairseq's checkpoint copies (``checkpoint_last.pt``, ``checkpoint_best.pt``) are atomic.
"""

from t2r_fairseq.checkpoint_errors import (
    name_dictionary_in_vocabulary_mismatches,
    name_path_in_checkpoint_errors,
    refuse_directories_as_checkpoints,
    surface_swap_errors_in_trainer,
)
from t2r_fairseq.checkpoint_files import make_checkpoint_copies_atomic
from t2r_fairseq.dataset_checks import check_datasets_when_loaded
from t2r_fairseq.fairseq_compat import allow_fairseq_checkpoint_globals, restore_numpy_compat_long
from t2r_fairseq.fairseq_help import complete_fairseq_help

allow_fairseq_checkpoint_globals()
name_path_in_checkpoint_errors()
restore_numpy_compat_long()
check_datasets_when_loaded()
refuse_directories_as_checkpoints()
name_dictionary_in_vocabulary_mismatches()
make_checkpoint_copies_atomic()
surface_swap_errors_in_trainer()

from t2r_fairseq.models import t2r_transformer, t2r_transformer_lm  # noqa: E402,F401  (registration)
from t2r_fairseq.models.step_scale import install_in_trainer  # noqa: E402

install_in_trainer()  # --feature-map-lr-scale: the maps' optimizer step is s times the optimizer's
from t2r_fairseq.criterions import attention_transfer  # noqa: E402,F401  (registration)

# Top-k attention (Gupta et al. 2021): models that evaluate a softmax checkpoint with no new tensors.
from t2r_fairseq.models import topk_transformer, topk_transformer_lm  # noqa: E402,F401  (registration)

# Last: it may print the help of the command line being parsed, which needs every model and criterion above.
complete_fairseq_help()

__version__ = "0.1.0"
