#!/usr/bin/env bash
# WMT17 ZH-EN with one joint sentencepiece model: News Commentary v12 + UN Parallel Corpus v1.0 (public
# tensorflow-datasets mirror) by default, CWMT from --cwmt-dir (manual download); valid = newsdev2017, test =
# newstest2017. Writes OUT/{train,valid,test}.{zh,en} (pieces), OUT/spm.model, OUT/ref/test.{zh,en}, OUT/DONE.
#
#   bash data-prep/wmt17_zhen.sh --out DIR [--raw DIR] [--spm-vocab N] [--corpora nc,un[,cwmt] --cwmt-dir DIR]
#
# Downloads go to --raw (default OUT/raw), resumable and verified (data-prep/download.py; T2R_DATA_MIRROR and
# T2R_DATA_CHECKSUMS as documented there). Finished steps are skipped on re-run; OUT/DONE is written last.
# All options: bash data-prep/wmt17_zhen.sh --help. Details: data-prep/README.md.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=python3
if [[ -x $ROOT/.venv/bin/python ]]; then export PATH=$ROOT/.venv/bin:$PATH; PY=python; fi
exec "$PY" "$ROOT/data-prep/prepare.py" wmt17_zhen "$@"
