#!/usr/bin/env bash
# Prepare, on a machine with network, what scripts/gpu_check.sh needs on a bare GPU machine that has none:
#   .whl/      the wheels its Python lacks (fairseq-fixed, hydra-core, omegaconf, antlr4, bitarray, fla), for
#              GPU_PYTHON (default 3.12: set it to the GPU machine's Python) on x86-64 Linux;
#   gpu-pack/  a softmax MT teacher and its T2R conversion (model weights only: optimizer state dropped) and the
#              binarised data of their test and valid splits, for the end-to-end fairseq-generate rows.
#
#   bash scripts/gpu_pack.sh TEACHER.pt T2R.pt DATA_BIN     # e.g. recipes/accuracy_study.sh's MT teacher and row
#
# Both folders are ignored by git; copy them into the checkout on the GPU machine (under 64 MiB together).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -ne 3 ]]; then
  echo "usage: bash scripts/gpu_pack.sh TEACHER.pt T2R.pt DATA_BIN" >&2; exit 2
fi
teacher=$1 t2r=$2 data=$3
for f in "$teacher" "$t2r" "$data/dict.$(ls "$data" | sed -n 's/^dict\.\(.*\)\.txt$/\1/p' | head -1).txt"; do
  [[ -e $f ]] || { echo "gpu_pack: $f does not exist; pass a teacher checkpoint, its T2R conversion and their data-bin" >&2; exit 2; }
done
PY=${PYTHON:-.venv/bin/python}
pyv=${GPU_PYTHON:-3.12}
mkdir -p .whl gpu-pack/data-bin
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyv" --implementation cp "${plat[@]}" \
  -d .whl fairseq-fixed==0.12.3.1 hydra-core==1.3.2 omegaconf==2.3.0 bitarray flash-linear-attention==0.6.0 fla-core==0.6.0
python3 -m pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w .whl   # pure Python, published as a source archive

# Model weights only: fairseq loads a checkpoint without its optimizer state for generation.
"$PY" - "$teacher" "$t2r" <<'PYEOF'
import sys, torch
for src, dst in zip(sys.argv[1:], ["gpu-pack/teacher.pt", "gpu-pack/t2r.pt"]):
    state = torch.load(src, map_location="cpu", weights_only=False)
    state.pop("last_optimizer_state", None)
    torch.save(state, dst)
    print(f"gpu_pack: {src} -> {dst}")
PYEOF
cp "$data"/dict.*.txt gpu-pack/data-bin/
for split in test valid; do cp "$data"/$split.* gpu-pack/data-bin/ 2>/dev/null || true; done
du -sh .whl gpu-pack
