#!/usr/bin/env bash
# Create (or reuse) the project virtualenv at .venv/ and install everything into it.
#
#   bash scripts/setup.sh          # idempotent; a no-op when nothing changed
#
# torch: if .venv already has a torch (e.g. a CUDA build you installed first with
#   python3 -m venv .venv && .venv/bin/pip install torch --index-url <your CUDA index>
# ) it is kept and pinned; otherwise the CPU build torch==2.13.0 is installed.
# Override with T2R_TORCH_SPEC="torch==X.Y.Z".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.t2r-setup-stamp
want=$(cat setup.py scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -f $STAMP && "$(cat "$STAMP")" == "$want" ]] && "$VENV/bin/python" -c "import fairseq, t2r_fairseq" 2>/dev/null; then
  exit 0
fi
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
if [[ -n "${T2R_TORCH_SPEC:-}" ]]; then
  torch_spec=$T2R_TORCH_SPEC
elif have=$("$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null); then
  torch_spec="torch==$have"
else
  torch_spec="torch==2.13.0"
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "$torch_spec" > "$constraints"
echo "[setup] installing build tools and $torch_spec into $VENV"
"${pip[@]}" install -q -c "$constraints" "$torch_spec" "setuptools>=68" wheel "cython>=3" numpy
# fairseq-fixed is an sdist with C/Cython extensions that import torch at build
# time: build it against the torch and numpy just installed (no isolated env).
echo "[setup] building fairseq-fixed and installing t2r-fairseq (a few minutes the first time)"
"${pip[@]}" install -q -c "$constraints" --no-build-isolation -e ".[test,plots]"
"$VENV/bin/python" -c "import fairseq, t2r_fairseq, torch; print(f'[setup] ok: torch {torch.__version__}, fairseq {fairseq.__version__}')" 2>/dev/null
echo "$want" > "$STAMP"
