"""t2r-fairseq: finetune pretrained softmax transformers into RNNs (T2R, Kasai et al. 2021).

Use as a fairseq user directory: ``fairseq-train --user-dir t2r_fairseq ...``. Importing it registers the
``t2r_transformer`` and ``t2r_transformer_lm`` models with their architectures, the top-k models
``topk_transformer`` and ``topk_transformer_lm``, the Shatter models ``shatter_transformer`` and
``shatter_roberta``, and the ``t2r_attention_transfer`` criterion: :mod:`t2r_fairseq.registry` lists them all, with
every fairseq function the plugin patches.

The package has two attention families beside the T2R attention code (``ops`` -> ``modules`` -> ``models``), each
a subpackage with its own math, modules, config and models that registers itself when imported:
:mod:`t2r_fairseq.topk` and :mod:`t2r_fairseq.shatter`. And two wings:

* :mod:`t2r_fairseq.conversion` -- the swap of a softmax checkpoint into a T2R model and the calibration of its
  new tensors;
* :mod:`t2r_fairseq.hardening` -- fairseq 0.12 made safe and legible for every model in the process (safe
  checkpoint loading, one-line errors, atomic checkpoint copies, dataset checks, ``--help``), installed from
  :func:`t2r_fairseq.registry.install`; ``T2R_FAIRSEQ_UNPATCHED=1`` leaves fairseq's functions as they are.

The modules' earlier paths (``t2r_fairseq.swap``, ``t2r_fairseq.checkpoint_errors``,
``t2r_fairseq.models.topk_transformer``, ``t2r_fairseq.ops.shatter``, ...: ``registry.OLD_PATHS``) remain
importable as the same module objects.
"""

from t2r_fairseq import hardening  # noqa: E402,F401  (first: refuses a torch below the floor before anything else)
from t2r_fairseq import registry  # noqa: E402

registry.register()  # models, architectures and criterion (registry.REGISTRATIONS)
registry.alias_old_paths()  # registry.OLD_PATHS
registry.install()  # last: the shims and registry.PATCHES; --help completion needs every registration above

__version__ = "0.1.0"
