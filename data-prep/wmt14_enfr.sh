#!/usr/bin/env bash
# WMT14 EN-FR as fairseq's examples/translation/prepare-wmt14en2fr.sh, with sacremoses + subword-nmt from PyPI:
# Europarl v7 + Common Crawl + UN + News Commentary v9 + Gigaword FR-EN; Moses normalise / remove non-printing /
# tokenise -a; valid = every 1333rd training line (as fairseq); joint BPE (40000 merges, or --bpe-codes FILE); clean
# (ratio 1.5, 1..250 tokens); test = newstest2014 (test-full). Writes OUT/{train,valid,test}.{en,fr}, OUT/code,
# OUT/ref/test.{en,fr}, OUT/DONE.
#
#   bash data-prep/wmt14_enfr.sh --out DIR [--raw DIR] [--bpe-tokens N | --bpe-codes FILE] [--workers N]
#
# Downloads go to --raw (default OUT/raw), resumable and verified (data-prep/download.py; T2R_DATA_MIRROR and
# T2R_DATA_CHECKSUMS as documented there). Finished steps are skipped on re-run; OUT/DONE is written last.
# All options: bash data-prep/wmt14_enfr.sh --help. Details: data-prep/README.md.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=python3
if [[ -x $ROOT/.venv/bin/python ]]; then export PATH=$ROOT/.venv/bin:$PATH; PY=python; fi
exec "$PY" "$ROOT/data-prep/prepare.py" wmt14_enfr "$@"
