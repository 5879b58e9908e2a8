#!/usr/bin/env bash
# The GPU checks of the CUDA decode step and fla's kernel in one run, each stage time-limited (under 8 minutes in
# all on one H200). They decide AUTO_DECODE_STEP["cuda"] and FLA_VERIFIED (docs/BENCHMARKS.md, "Decode paths").
# On a GPU machine without network, prepare first on one with network: bash scripts/gpu_pack.sh TEACHER.pt T2R.pt
# DATA_BIN, and copy .whl/ and gpu-pack/ into this checkout. Then, on the GPU machine:
#
#   bash scripts/gpu_check.sh       # writes everything under $GPU_CHECK_DIR (default runs/gpu-check); with
#                                   # OUT=DIR also DIR/summary.md and DIR/gpu-check.tar.gz (one summary, one archive)
#
# 1. equivalence on CUDA: the captured / compiled decode step against the eager oracle (fp32 <= 1e-5, bf16
#    bounded; beam reorder, finished hypotheses, two batches), and fla's chunk kernel against the naive oracle
#    (its first call compiles Triton kernels: minutes);
# 2. decode benchmark, bf16, every model on eager and graph paths (softmax: SDPA over a static KV cache): default
#    size at batch 1/16/64/256 x context 256..8192 with the 16 GiB budget rows; the paper's WikiText-103 LM size
#    (16 layers, d 1024) and transformer-big MT at batch 16/64, contexts 1024 and 8192;
# 3. training rows: fla's chunk kernel against the pure-torch chunkwise form (decides --linear-kernel auto);
# 4. end-to-end fairseq-generate sentences/s (--batch-size 128 --beam 4): teacher vs T2R eager vs T2R graph.
# Each stage has its own time limit, so one that hangs (fla's first compilation did once) leaves the others' figures.
# GPU_CHECK_DRY=1: the same stages on CPU at the benchmark's tiny sizes (checks this script where no GPU is).
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${GPU_CHECK_DIR:-runs/gpu-check}
mkdir -p "$DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [[ ${GPU_CHECK_DRY:-0} != 1 ]] && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
say() { echo "=== [gpu_check $(date +%T)] $*"; }
stage() {  # name seconds command...: run with a limit, keep its log, never stop the script
  local name=$1 limit=$2; shift 2
  say "$name (limit ${limit}s)"
  timeout "$limit" "$@" > "$DIR/$name.log" 2>&1; local rc=$?
  say "$name: exit $rc"; tail -3 "$DIR/$name.log"
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
  git log -1 --format='commit %h %cs' 2>/dev/null; } | tee "$DIR/machine.txt"

if [[ ${GPU_CHECK_DRY:-0} == 1 ]]; then
  DEV=(--device cpu --dtype float32 --threads 2) GEN=(--cpu) GEN_LIMIT=300
  GRID=(--tiny --batches 1,2 --contexts 8,32 --budget-contexts 32 --memory-budget-gib 0.0001)
  LM_BIG=(--tiny --layers 2 --dim 32 --heads 4 --batches 2 --contexts 32) MT_BIG=("${LM_BIG[@]}" --mt-source-length 16)
  TRAIN=(--tiny --train-lengths 64)
else
  DEV=(--device cuda --dtype bfloat16 --threads 0) GEN=(--bf16) GEN_LIMIT=100
  GRID=(--batches 1,16,64,256 --contexts 256,1024,8192 --memory-budget-gib 16 --budget-contexts 2048,8192)
  LM_BIG=(--layers 16 --dim 1024 --heads 8 --batches 16,64 --contexts 1024,8192)
  MT_BIG=(--layers 6 --dim 1024 --heads 16 --batches 16,64 --contexts 1024,8192 --mt-source-length 1024)
  TRAIN=(--train-lengths 512,2048,8192 --chunk-sweep 64)
fi
stage tests 110 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_decode_step.py tests/test_linear_attention.py \
  -k "cuda or fla"
BENCH=("$PY" -m t2r_fairseq.bench "${DEV[@]}" --skip train --decode-steps eager,graph --warmup 3 --repeats 10)
stage bench_default 110 "${BENCH[@]}" --out "$DIR/bench-default" "${GRID[@]}"
stage bench_lm_wt103 45 "${BENCH[@]}" --out "$DIR/bench-lm-wt103" --tasks lm "${LM_BIG[@]}"
stage bench_mt_big 45 "${BENCH[@]}" --out "$DIR/bench-mt-big" --tasks mt "${MT_BIG[@]}"
stage bench_train 45 "$PY" -m t2r_fairseq.bench "${DEV[@]}" --skip decode --out "$DIR/bench-train" --topk-k 0 "${TRAIN[@]}"
if [[ -f gpu-pack/teacher.pt && -f gpu-pack/t2r.pt ]]; then
  stage generate "$GEN_LIMIT" env DECODE_PATHS=graph REPS=2 bash scripts/generate_speed.sh gpu-pack/data-bin gpu-pack/teacher.pt gpu-pack/t2r.pt \
    "$DIR/generate" "${GEN[@]}"
else
  say "generate: skipped (no gpu-pack/; run scripts/gpu_pack.sh first)"
fi
for f in "$DIR"/machine.txt "$DIR"/bench-*/results.md "$DIR"/generate/generate_speed.md "$DIR"/tests.log; do
  [[ -f $f ]] && { echo "## $f"; cat "$f"; echo; }
done > "$DIR/summary.md"
COPY_TO=${OUT:-}  # OUT=DIR: one summary and one archive of everything, to copy off the machine
if [[ -n $COPY_TO && $COPY_TO != "$DIR" ]]; then
  cp "$DIR/summary.md" "$COPY_TO/summary.md"
  tar czf "$COPY_TO/gpu-check.tar.gz" -C "$(dirname "$DIR")" "$(basename "$DIR")"
fi
say "done: $DIR"
