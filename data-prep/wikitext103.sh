#!/usr/bin/env bash
# WikiText-103 for language modelling: downloads wikitext-103-v1.zip (the URL fairseq's
# examples/language_model/prepare-wikitext-103.sh uses; MD5-verified) and writes fairseq's LM layout
# OUT/wiki.{train,valid,test}.tokens (binarise with fairseq-preprocess --only-source).
#
#   bash data-prep/wikitext103.sh --out DIR [--raw DIR]
#
# Downloads go to --raw (default OUT/raw), resumable and verified (data-prep/download.py; T2R_DATA_MIRROR and
# T2R_DATA_CHECKSUMS as documented there). Finished steps are skipped on re-run; OUT/DONE is written last.
# All options: bash data-prep/wikitext103.sh --help. Details: data-prep/README.md.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=python3
if [[ -x $ROOT/.venv/bin/python ]]; then export PATH=$ROOT/.venv/bin:$PATH; PY=python; fi
exec "$PY" "$ROOT/data-prep/prepare.py" wikitext103 "$@"
