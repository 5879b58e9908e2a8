"""What the plugin adds to fairseq, in one place: its registrations, its patches and its old module paths.

``--user-dir t2r_fairseq`` imports the package, whose ``__init__`` runs, in order, :func:`register` (the modules
in :data:`REGISTRATIONS`, each of which registers its models, architectures or criterion with fairseq's
decorators as it is imported), :func:`alias_old_paths` (:data:`OLD_PATHS`) and :func:`install` (the shims and
:data:`PATCHES`). Everything fairseq sees of the plugin is therefore listed in this file; ``tests/test_registry.py``
holds the same lists as fairseq's registries report them.
"""

from __future__ import annotations

import importlib
import logging
import sys
from dataclasses import dataclass
from typing import Tuple

from t2r_fairseq.hardening import SWITCH, unpatched
from t2r_fairseq.hardening.checkpoint_errors import (
    check_vocabulary,
    name_data_directory,
    name_the_file,
    refuse_directories,
    safe_loading_torch,
    surface,
)
from t2r_fairseq.hardening.checkpoint_files import atomic_for_local_files
from t2r_fairseq.hardening.dataset_checks import check_first
from t2r_fairseq.hardening.fairseq_compat import allow_fairseq_checkpoint_globals, restore_numpy_compat_long
from t2r_fairseq.hardening.fairseq_help import help_after_all_options, print_help_in_progress
from t2r_fairseq.hardening.model_overrides import set_generation_overrides
from t2r_fairseq.hardening.patching import Patch
from t2r_fairseq.models.carried_state import stream_order_dataloader
from t2r_fairseq.models.step_scale import scale_maps_after

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registration:
    """A module that registers something with fairseq when imported, and what it registers."""

    module: str
    models: Tuple[str, ...] = ()
    architectures: Tuple[str, ...] = ()
    criteria: Tuple[str, ...] = ()


_MT_ARCHS = ("", "_iwslt_de_en", "_wmt_en_de", "_wmt_en_de_big", "_vaswani_wmt_en_de_big", "_vaswani_wmt_en_fr_big")

REGISTRATIONS: Tuple[Registration, ...] = (
    Registration("t2r_fairseq.models.t2r_transformer", ("t2r_transformer",),
                 tuple(f"t2r_transformer{a}" for a in _MT_ARCHS)),
    Registration("t2r_fairseq.models.t2r_transformer_lm", ("t2r_transformer_lm",),
                 ("t2r_transformer_lm_gpt", "t2r_transformer_lm_wiki103")),
    Registration("t2r_fairseq.criterions.attention_transfer", criteria=("t2r_attention_transfer",)),
    # Top-k attention (Gupta et al. 2021): models that evaluate a softmax checkpoint with no new tensors.
    Registration("t2r_fairseq.topk", ("topk_transformer", "topk_transformer_lm"),
                 tuple(f"topk_transformer{a}" for a in _MT_ARCHS)
                 + ("topk_transformer_lm_big", "topk_transformer_lm_gpt", "topk_transformer_lm_wiki103")),
    # Shatter (docs/SHATTER.md); also offers --encoder-attention shatter to t2r_transformer. roberta_small is a
    # preset of fairseq's own roberta model, the multi-head baseline of shatter_roberta_small.
    Registration("t2r_fairseq.shatter", ("shatter_roberta", "shatter_transformer"),
                 ("shatter_roberta_base", "shatter_roberta_small", "roberta_small", "shatter_transformer",
                  "shatter_transformer_iwslt_de_en")),
)


def register() -> None:
    """Import every module of :data:`REGISTRATIONS`, then check that fairseq knows what each one said it adds.

    The check makes this table the truth: a registration renamed or dropped in a module fails at import,
    naming the module, instead of surfacing as fairseq's "invalid choice" in a user's command.
    """
    from fairseq.criterions import CRITERION_REGISTRY
    from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY

    for row in REGISTRATIONS:
        importlib.import_module(row.module)
        missing = ([m for m in row.models if m not in MODEL_REGISTRY]
                   + [a for a in row.architectures if a not in ARCH_MODEL_REGISTRY]
                   + [c for c in row.criteria if c not in CRITERION_REGISTRY])
        if missing:
            raise ImportError(f"{row.module} did not register {', '.join(missing)} (t2r_fairseq.registry)")


# Module paths that moved -> where they live now. The old path imports the very same module object, so a
# monkeypatch, an isinstance check or a pickled reference through either path agrees.
OLD_PATHS = {
    "t2r_fairseq.swap": "t2r_fairseq.conversion.swap",
    "t2r_fairseq.calibration": "t2r_fairseq.conversion.calibration",
    "t2r_fairseq.checkpoint_errors": "t2r_fairseq.hardening.checkpoint_errors",
    "t2r_fairseq.checkpoint_files": "t2r_fairseq.hardening.checkpoint_files",
    "t2r_fairseq.dataset_checks": "t2r_fairseq.hardening.dataset_checks",
    "t2r_fairseq.fairseq_compat": "t2r_fairseq.hardening.fairseq_compat",
    "t2r_fairseq.fairseq_help": "t2r_fairseq.hardening.fairseq_help",
    "t2r_fairseq.patching": "t2r_fairseq.hardening.patching",
    "t2r_fairseq.ops.shatter": "t2r_fairseq.shatter.ops",
    "t2r_fairseq.modules.shatter_attention": "t2r_fairseq.shatter.attention",
    "t2r_fairseq.models.shatter_config": "t2r_fairseq.shatter.config",
    "t2r_fairseq.models.shatter_layers": "t2r_fairseq.shatter.layers",
    "t2r_fairseq.models.shatter_transformer": "t2r_fairseq.shatter.transformer",
    "t2r_fairseq.models.shatter_roberta": "t2r_fairseq.shatter.roberta",
    "t2r_fairseq.ops.topk_attention": "t2r_fairseq.topk.ops",
    "t2r_fairseq.modules.topk_multihead_attention": "t2r_fairseq.topk.multihead_attention",
    "t2r_fairseq.modules.topk_feed_forward": "t2r_fairseq.topk.feed_forward",
    "t2r_fairseq.models.topk_config": "t2r_fairseq.topk.config",
    "t2r_fairseq.models.topk_layers": "t2r_fairseq.topk.layers",
    "t2r_fairseq.models.topk_transformer": "t2r_fairseq.topk.transformer",
    "t2r_fairseq.models.topk_transformer_lm": "t2r_fairseq.topk.transformer_lm",
}


def alias_old_paths() -> None:
    """Make every old path of :data:`OLD_PATHS` import (and be an attribute of its package as) the moved module."""
    for old, new in OLD_PATHS.items():
        module = importlib.import_module(new)
        sys.modules.setdefault(old, module)
        parent, _, leaf = old.rpartition(".")
        setattr(importlib.import_module(parent), leaf, module)


FAIRSEQ = "0.12.3.1"  # fairseq-fixed, the 0.12 code the plugin pins (setup.py)

# Every fairseq attribute the plugin replaces, in the order applied (two rows wrap load_checkpoint_to_cpu: the
# later one is outermost). The wrappers live with their wing; ``why`` is the one-line reason.
PATCHES: Tuple[Patch, ...] = (
    Patch("fairseq.trainer:Trainer", "_build_optimizer", scale_maps_after, FAIRSEQ,
          "--feature-map-lr-scale: the feature maps' optimizer step is s times the optimizer's", always=True),
    Patch("fairseq.tasks.language_modeling:LanguageModelingTask", "eval_lm_dataloader", stream_order_dataloader,
          FAIRSEQ, "--carry-state: fairseq-eval-lm serves the blocks in stream order, one per batch", always=True),
    Patch("fairseq.checkpoint_utils", "torch", safe_loading_torch, FAIRSEQ,
          "checkpoints load with weights_only=True whatever torch's default", replace=True),
    Patch("fairseq.checkpoint_utils", "load_checkpoint_to_cpu", name_the_file, FAIRSEQ,
          "an unreadable checkpoint is one line naming the file and what it is"),
    Patch("fairseq.checkpoint_utils", "load_checkpoint_to_cpu", set_generation_overrides, FAIRSEQ,
          "--model-overrides of generation options reach checkpoints older than the option"),
    Patch("fairseq.data.data_utils", "load_indexed_dataset", check_first, FAIRSEQ,
          "binarised splits are checked against their dictionary when loaded"),
    Patch("fairseq.checkpoint_utils", "load_checkpoint", refuse_directories, FAIRSEQ,
          "--finetune-from-model / --restore-file DIR is refused instead of training from scratch"),
    Patch("fairseq.models:BaseFairseqModel", "load_state_dict", check_vocabulary, FAIRSEQ,
          "another dictionary is named as such, not as a size-mismatch list"),
    Patch("fairseq.checkpoint_utils", "load_model_ensemble_and_task", name_data_directory, FAIRSEQ,
          "a dictionary mismatch names the checkpoint and the data directory"),
    Patch("fairseq.file_io:PathManager", "copy", atomic_for_local_files, FAIRSEQ,
          "checkpoint_last.pt / checkpoint_best.pt copies are atomic"),
    Patch("fairseq.trainer:Trainer", "load_checkpoint", surface, FAIRSEQ,
          "a SwapError is the last line fairseq-train prints"),
    # Last: it may print the --help of the command line being parsed, which needs every row above and every
    # registration.
    Patch("fairseq.options", "parse_args_and_arch", help_after_all_options, FAIRSEQ,
          "--help lists the chosen model's, task's and criterion's options", then=print_help_in_progress),
)


def install() -> bool:
    """Apply the compatibility shims and :data:`PATCHES` (each once per process); False when ``SWITCH`` is set.

    With ``T2R_FAIRSEQ_UNPATCHED`` set only the ``always`` rows (the plugin's own ``--feature-map-lr-scale``) and
    the shims without which fairseq 0.12 does not run on this stack (its config types allowed by torch's safe
    unpickler; numpy 2's removed ``np.compat.long``) are applied. Call after :func:`register`.
    """
    allow_fairseq_checkpoint_globals()
    restore_numpy_compat_long()
    leave_fairseq = unpatched()
    for patch in PATCHES:
        if patch.always or not leave_fairseq:
            patch.apply()
    if leave_fairseq:
        logger.info(f"{SWITCH} is set: fairseq's functions are left unpatched")
    return not leave_fairseq
