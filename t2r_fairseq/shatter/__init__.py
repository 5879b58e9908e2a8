"""Shatter (docs/SHATTER.md): single-headed attention over soft relative-position partitions, as one family.

Layered as the plugin is: :mod:`.ops` (the math, no fairseq) -> :mod:`.attention` (the module) -> :mod:`.config`
(``--shatter-*`` and their checks), :mod:`.layers` (fairseq's encoder layer and stack with it) -> the models
:mod:`.transformer` (``shatter_transformer``; also offers ``--encoder-attention shatter`` to every model that
takes the option, ``t2r_transformer`` included) and :mod:`.roberta` (``shatter_roberta``, ``roberta_small``).

Importing the package registers them all; nothing in ``t2r_fairseq.models`` imports it.
"""

from t2r_fairseq.shatter import roberta, transformer  # noqa: F401  (registration)
