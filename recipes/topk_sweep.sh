#!/usr/bin/env bash
# Top-k attention on unmodified softmax checkpoints (docs/RESULTS.md, "Top-k attention"): no training, only
# evaluation. Converts each teacher once with t2r_fairseq.tools.to_topk, then varies k with --model-overrides.
#
#   bash recipes/topk_sweep.sh [--out runs/topk] [--study runs/study] [--tasks lm,mt]
#          [--ks "1 2 4 8 16 32 64"] [--ffn-ks "32 64 128 256"]
#
# --study DIR   the accuracy study's output (data-bin/{lm,mt}, checkpoints/teacher.{lm,mt}/checkpoint_best.pt)
# Writes $OUT/{lm,mt}/<row>.log and one line per row to $OUT/results.tsv (task, row, metric, value, seconds).
# Finished rows (a log ending in the metric) are skipped on re-run.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=runs/topk STUDY=runs/study TASKS=lm,mt KS="1 2 4 8 16 32 64" FFN_KS="32 64 128 256"
while (($#)); do
  case $1 in
    --out) OUT=$2; shift 2;; --study) STUDY=$2; shift 2;; --tasks) TASKS=$2; shift 2;;
    --ks) KS=$2; shift 2;; --ffn-ks) FFN_KS=$2; shift 2;;
    -h|--help) sed -n '2,10p' "$0"; exit 0;;
    *) echo "topk_sweep: unknown option $1 (see --help)" >&2; exit 2;;
  esac
done
PY=${PYTHON:-python} LM_TPS=${LM_TPS:-256}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$OUT/lm" "$OUT/mt"
has() { [[ ",$2," == *",$1,"* ]]; }

LM_EVAL=(--user-dir "$ROOT/t2r_fairseq" --cpu --gen-subset test --tokens-per-sample "$LM_TPS" --max-tokens 4096
         --required-batch-size-multiple 1 --num-workers 0)
MT_EVAL=(--user-dir "$ROOT/t2r_fairseq" --cpu --gen-subset test --beam 4 --max-tokens 4096 --post-process sentencepiece
         --scoring sacrebleu --required-batch-size-multiple 1 --distributed-world-size 1 --num-workers 0)

# row NAME TASK TOOL CHECKPOINT [OVERRIDES]
row() {
  local name=$1 task=$2 tool=$3 ckpt=$4 overrides=${5:-} log="$OUT/$2/$1.log" data="$STUDY/data-bin/$2"
  local pattern='Perplexity: [0-9.]+' metric=ppl; [[ $task == mt ]] && pattern='BLEU = [0-9.]+' metric=bleu
  if [[ -f $log ]] && grep -Eq "$pattern" "$log"; then return; fi
  local args=("${LM_EVAL[@]}"); [[ $task == mt ]] && args=("${MT_EVAL[@]}")
  [[ -n $overrides ]] && args+=(--model-overrides "$overrides")
  local start=$SECONDS
  "$tool" "$data" --path "$ckpt" "${args[@]}" > "$log" 2>&1
  local value; value=$(grep -Eo "$pattern" "$log" | tail -1 | grep -Eo '[0-9.]+$')
  printf '%s\t%s\t%s\t%s\t%s\n' "$task" "$name" "$metric" "$value" "$((SECONDS - start))" >> "$OUT/results.tsv"
  echo "topk_sweep: $task $name $metric $value ($((SECONDS - start)) s)"
}

for task in lm mt; do
  has "$task" "$TASKS" || continue
  teacher="$STUDY/checkpoints/teacher.$task/checkpoint_best.pt"
  tool=fairseq-eval-lm; [[ $task == mt ]] && tool=fairseq-generate
  converted="$OUT/$task/topk.pt"
  [[ -f $converted ]] || "$PY" -m t2r_fairseq.tools.to_topk "$teacher" "$converted" --topk-k 32
  row softmax "$task" "$tool" "$teacher"
  for k in $KS; do row "attn_k$k" "$task" "$tool" "$converted" "{'topk_k': $k}"; done
  for k in $FFN_KS; do row "ffn_k$k" "$task" "$tool" "$converted" "{'topk_attention': 'none', 'topk_ffn_k': $k}"; done
done
