"""t2r-fairseq: finetune pretrained softmax transformers into RNNs (T2R, Kasai et al. 2021).

Use as a fairseq user directory: ``fairseq-train --user-dir t2r_fairseq ...``.
Importing it registers the ``t2r_transformer`` and ``t2r_transformer_lm``
models with their architectures, and makes fairseq checkpoints loadable under
torch's safe (``weights_only``) unpickler.
"""

from t2r_fairseq.checkpoint_compat import allow_fairseq_checkpoint_globals, name_path_in_checkpoint_errors

allow_fairseq_checkpoint_globals()
name_path_in_checkpoint_errors()

from t2r_fairseq.models import t2r_transformer, t2r_transformer_lm  # noqa: E402,F401  (registration)

__version__ = "0.1.0"
