# Shatter (docs/SHATTER.md): importing registers the shatter_roberta and shatter_transformer models and their archs.
from t2r_fairseq.models import shatter_roberta, shatter_transformer  # noqa: F401  (registration)
