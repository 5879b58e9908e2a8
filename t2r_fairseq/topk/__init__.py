"""Top-k attention (Gupta et al. 2021) as one family: a softmax checkpoint evaluated, or finetuned, with each
query attending to its k highest-scoring keys and no new tensors.

Layered as the plugin is: :mod:`.ops` (the chunked math, no fairseq) -> :mod:`.multihead_attention` and
:mod:`.feed_forward` (the modules) -> :mod:`.config` (``--topk-*`` and their checks), :mod:`.layers` (fairseq's
layers and stacks with them) -> the models :mod:`.transformer` (``topk_transformer``) and
:mod:`.transformer_lm` (``topk_transformer_lm``). ``python -m t2r_fairseq.tools.to_topk`` builds them from a
softmax checkpoint.

Importing the package registers the models and their architectures, and adds
:class:`~.multihead_attention.TopkMultiheadAttention` to the attentions that replace a softmax one
(:mod:`t2r_fairseq.modules.replaced_attention`).
"""

from t2r_fairseq.topk import transformer, transformer_lm  # noqa: F401  (registration)
