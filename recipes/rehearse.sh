#!/usr/bin/env bash
# Full-size rehearsal of the paper recipes on the CPU: each recipe's own stages at its real dimensions and
# dictionary size, on a synthetic corpus of that size, for a handful of updates.
#
#   bash recipes/rehearse.sh [--out DIR] [--recipes wikitext103_lm,wmt14_ende,wmt14_enfr,wmt17_zhen]
#
# Per recipe, under DIR/RECIPE (the recipe's own work dir layout):
#   data       synthetic corpus + dictionary of the recipe's real size (t2r_fairseq.tools.rehearsal data),
#              binarised with fairseq-preprocess as the recipe's prep stage does with a public dictionary
#   teacher    the recipe's teacher stage (TEACHER=train, its teacher config) for TEACHER_UPDATES update(s): a
#              softmax model of the real architecture (16 x 1024 adaptive input/softmax LM; transformer-big MT)
#   calibrate  the recipe's calibrate stage (python -m t2r_fairseq.tools.convert on the teacher, the README's
#              calibration) with CAL_STEPS steps per layer (0: the swap alone, no fitting) -> checkpoints/calibrated.pt
#   finetune   the recipe's finetune stage: its hydra config unchanged (optimizer, schedule, clipping,
#              --feature-map-lr-scale, criterion), loading the calibrated checkpoint, UPDATES updates at one
#              GPU's batch (UPDATE_FREQ=1, the config's max_tokens), warm-up shortened to 1 update so the peak
#              learning rate is reached, common.fp16=false and common.cpu=true (the recipes' CPU=1 mode)
#   eval       the recipe's eval stage on the finetuned checkpoint (fairseq-eval-lm / fairseq-generate + scoring)
#   report     the loss must be finite and fall; one row of peak resident memory and time per stage -> DIR/rehearsal.md
#
# Environment: UPDATES [4]  TEACHER_UPDATES [1]  CAL_STEPS [300]  TRAIN_LINES [2000]  KEEP_CHECKPOINTS [0]
#   SIZE [full] | tiny: the same code path at test size (2 layers, d = 32, a 600-word dictionary; tests/test_rehearsal.py)
#   OMP_NUM_THREADS [2]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=runs/rehearse RECIPES_ARG=wikitext103_lm,wmt14_ende,wmt14_enfr,wmt17_zhen
while [[ $# -gt 0 ]]; do
  case $1 in
    --out) OUT=$2; shift 2;;
    --recipes) RECIPES_ARG=$2; shift 2;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0;;
    *) echo "rehearse: unknown option $1 (see --help)" >&2; exit 2;;
  esac
done
UPDATES=${UPDATES:-4} TEACHER_UPDATES=${TEACHER_UPDATES:-1} CAL_STEPS=${CAL_STEPS:-300} TRAIN_LINES=${TRAIN_LINES:-2000}
SIZE=${SIZE:-full} KEEP_CHECKPOINTS=${KEEP_CHECKPOINTS:-0}
for v in UPDATES TEACHER_UPDATES CAL_STEPS TRAIN_LINES; do
  [[ ${!v} =~ ^[0-9]+$ ]] || { echo "rehearse: $v must be a non-negative integer (got '${!v}')" >&2; exit 2; }
done
(( UPDATES >= 2 )) || { echo "rehearse: UPDATES must be >= 2 (a falling loss needs two updates)" >&2; exit 2; }
[[ $SIZE == full || $SIZE == tiny ]] || { echo "rehearse: SIZE must be full or tiny (got '$SIZE')" >&2; exit 2; }
BIN=${FAIRSEQ_BIN:-$ROOT/.venv/bin}
[[ -x $BIN/fairseq-train ]] || { echo "rehearse: fairseq not found in $BIN; run 'bash scripts/setup.sh' first" >&2; exit 1; }
PY=$BIN/python
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONWARNINGS=ignore FAIRSEQ_BIN=$BIN CPU=1 UPDATE_FREQ=1
say() { echo "=== [rehearse $(date -u +%T)] $*" >&2; }
MD=$OUT/rehearsal.md failed=()
if [[ ! -f $MD ]]; then
  { echo "| recipe | updates | train loss first -> last | s/update | teacher: peak RSS / wall | calibrate | finetune | eval |"
    echo "|---|---|---|---|---|---|---|---|"; } > "$MD"
fi

for recipe in ${RECIPES_ARG//,/ }; do
  [[ -f $ROOT/recipes/$recipe.sh ]] || { echo "rehearse: unknown recipe '$recipe'" >&2; exit 2; }
  W=$OUT/$recipe
  rm -rf "$W"; mkdir -p "$W/.done" "$W/measure"
  vocab=() overrides="" arch=()
  if [[ $SIZE == tiny ]]; then
    vocab=(--vocab 600)
    if [[ $recipe == wikitext103_lm ]]; then
      arch=(LAYERS=2 TOKENS_PER_SAMPLE=64 EVAL_TOKENS_PER_SAMPLE=64 EVAL_CONTEXT_WINDOW=32 MAX_TOKENS=256)
      overrides="model.decoder_embed_dim=32 model.decoder_input_dim=32 model.decoder_output_dim=32 \
model.decoder_ffn_embed_dim=64 model.decoder_attention_heads=4 model.adaptive_input_cutoff='100,300' \
model.adaptive_softmax_cutoff='100,300'"
    else
      arch=(MAX_TOKENS=512)
      overrides="model.encoder_layers=2 model.decoder_layers=2 model.encoder_embed_dim=32 model.decoder_embed_dim=32 \
model.encoder_ffn_embed_dim=64 model.decoder_ffn_embed_dim=64 model.encoder_attention_heads=4 \
model.decoder_attention_heads=4"
    fi
  fi
  overrides="$overrides dataset.num_workers=0"

  say "$recipe: synthetic data"
  "$PY" -m t2r_fairseq.tools.rehearsal data --recipe "$recipe" --out "$W/data" --train-lines "$TRAIN_LINES" "${vocab[@]}" >&2
  if [[ $recipe == wikitext103_lm ]]; then
    "$BIN/fairseq-preprocess" --only-source --srcdict "$W/data/dict.txt" --trainpref "$W/data/wiki.train.tokens" \
      --validpref "$W/data/wiki.valid.tokens" --testpref "$W/data/wiki.test.tokens" --destdir "$W/data-bin" \
      --workers 2 > "$W/preprocess.log" 2>&1
    finetune_env=(WARMUP_UPDATES=1) overrides_ft=""   # the LM recipe sets its warm-up from WARMUP_UPDATES
    eval_env=(EVAL_SUBSETS=test)
  else
    read -r src tgt < <("$PY" -c "from t2r_fairseq.tools.rehearsal import LANGS; print(*LANGS['$recipe'])")
    if [[ -f $W/data/dict.joined.txt ]]; then dicts=(--srcdict "$W/data/dict.joined.txt" --tgtdict "$W/data/dict.joined.txt")
    else dicts=(--srcdict "$W/data/dict.$src.txt" --tgtdict "$W/data/dict.$tgt.txt"); fi
    "$BIN/fairseq-preprocess" --source-lang "$src" --target-lang "$tgt" --trainpref "$W/data/train" \
      --validpref "$W/data/valid" --testpref "$W/data/test" --destdir "$W/data-bin" "${dicts[@]}" \
      --workers 2 > "$W/preprocess.log" 2>&1
    finetune_env=()
    overrides_ft="lr_scheduler.warmup_updates=1"
    eval_env=()
  fi
  touch "$W/.done/prep"
  run_recipe() {  # run_recipe STAGE MEASURE-NAME [ENV=VALUE ...]
    local stage=$1 name=$2; shift 2
    say "$recipe: $stage"
    env "$@" "$PY" -m t2r_fairseq.tools.rehearsal measure --out "$W/measure/$name.json" -- \
      bash "$ROOT/recipes/$recipe.sh" --out "$W" --stages "$stage" > "$W/$name.stdout" 2>&1 \
      || { tail -n 30 "$W/$name.stdout" >&2; echo "rehearse: $recipe: stage $stage failed (log $W/$name.stdout)" >&2; return 1; }
  }
  rehearse_one() {
    run_recipe teacher teacher TEACHER=train TEACHER_MAX_UPDATE="$TEACHER_UPDATES" "${arch[@]}" \
      TRAIN_OVERRIDES="$overrides" TEACHER_OVERRIDES="common.log_interval=1" || return 1
    # the recipe's own calibrate stage (CPU=1: --device cpu), which the finetune stage then starts from
    run_recipe calibrate calibrate TEACHER=train CALIBRATE_STEPS="$CAL_STEPS" "${arch[@]}" || return 1
    run_recipe finetune finetune TEACHER=train MAX_UPDATE="$UPDATES" "${arch[@]}" "${finetune_env[@]}" \
      TRAIN_OVERRIDES="$overrides" FINETUNE_OVERRIDES="common.log_interval=1 $overrides_ft" || return 1
    run_recipe eval eval TEACHER=train EVAL_MODELS=t2r EVAL_CHECKPOINT=checkpoint_last.pt "${arch[@]}" "${eval_env[@]}" || return 1
    measured=("$W/measure/teacher.json" "$W/measure/calibrate.json" "$W/measure/finetune.json" "$W/measure/eval.json")
    "$PY" -m t2r_fairseq.tools.rehearsal report --recipe "$recipe" --log "$W/logs/finetune.log" \
      --measured "${measured[@]}" --md "$MD" --json "$W/rehearsal.json" >&2 || return 1
  }
  rehearse_one || failed+=("$recipe")
  [[ $KEEP_CHECKPOINTS == 1 ]] || rm -rf "$W/checkpoints"
done
say "done: $MD"
cat "$MD"
if (( ${#failed[@]} )); then echo "rehearse: failed: ${failed[*]} (logs under $OUT)" >&2; exit 1; fi
