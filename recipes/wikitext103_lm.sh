#!/usr/bin/env bash
# WikiText-103 language model: softmax teacher -> T2R swap, calibrate, finetune -> perplexity (Kasai et al. 2021, Table 1).
#
#   bash recipes/wikitext103_lm.sh [--out DIR] [--stages prep,teacher,calibrate,finetune,eval] [--force] [--dry-run]
#
# Stages (each skipped when $OUT/.done/<stage> exists; --force redoes the listed stages):
#   prep      data-prep/wikitext103.sh and fairseq-preprocess --only-source (with the public teacher: its
#             dict.txt, so that token ids match its adaptive input/softmax) -> $OUT/data-bin
#   teacher   TEACHER=download (default): fairseq's public transformer_lm.wiki103.adaptive (adaptive_lm_wiki103.v2,
#             Baevski & Auli 2019: 16 layers, d=1024, adaptive input/softmax, trained on 3072-token blocks);
#             TEACHER=train: train that architecture on TOKENS_PER_SAMPLE-token blocks (configs/wikitext103_lm_teacher.yaml)
#   calibrate SWAP=calibrated (default, the README's recommended recipe): python -m t2r_fairseq.tools.convert
#             on the teacher (--feature-map t2r_qk --feature-size $FEATURE_SIZE): the swap, then each new feature map
#             fitted to the teacher's softmax attention -> $OUT/checkpoints/calibrated.pt (log $OUT/logs/calibrate.log);
#             one process on node 0, on a GPU unless CPU=1. SWAP=plain: nothing to do
#   finetune  finetune t2r_transformer_lm on TOKENS_PER_SAMPLE-token blocks (configs/wikitext103_lm_finetune.yaml)
#             from the calibrated checkpoint with the t2r_qk map and --feature-map-lr-scale 8; SWAP=plain: from
#             the teacher itself (the swap happens as it loads) with the paper's map and one learning rate
#             (model.feature_map=t2r model.feature_map_lr_scale=1.0); interrupted? run it again: fairseq
#             resumes from $OUT/checkpoints/t2r/checkpoint_last.pt
#   eval      fairseq-eval-lm on valid and test with --tokens-per-sample/--context-window (sliding window: each
#             token is scored with at least CONTEXT tokens of left context), ending in the perplexity lines
#
# Options: --out DIR (default runs/wikitext103_lm; env WORK), --stages LIST (env STAGES), --force (env FORCE=1),
#          --dry-run (env DRY_RUN=1: print the exact commands, one per line, run nothing), -h/--help.
# Environment (defaults in brackets):
#   TEACHER [download] | train        TEACHER_CKPT   use this softmax checkpoint instead
#   TEACHER_URL [fairseq's archive]  TEACHER_SHA256  verify the archive (we know of no published checksum)
#   NUM_GPUS [8]  NUM_NODES [1]  NODE_RANK [0]  MASTER_ADDR [localhost]  MASTER_PORT [29500]
#   LAUNCHER [auto] | spawn | torchrun | srun     CPU [0]  CPU_PROCS [1]  (CPU=1: gloo, for smoke tests)
#   MAX_UPDATE [50000] finetune updates   WARMUP_UPDATES [4000] finetune warm-up (the cosine period is the rest)
#   TEACHER_MAX_UPDATE [286000]   MAX_TOKENS [3072] per GPU   TOKENS_PER_SAMPLE [512] training block
#   UPDATE_FREQ [config x 8 / world size]   FEATURE_SIZE [32]   LAYERS [16] (teacher and T2R must agree)
#   EVAL_TOKENS_PER_SAMPLE [512]  EVAL_CONTEXT_WINDOW [480]  (T2R model)
#   TEACHER_EVAL_TOKENS_PER_SAMPLE [3072]  TEACHER_EVAL_CONTEXT_WINDOW [2560]  (public teacher; a teacher
#   trained here (TEACHER=train) defaults to the T2R model's values)
#   EVAL_MODELS ["teacher t2r"]  EVAL_SUBSETS ["valid test"]  EVAL_CHECKPOINT [checkpoint_best.pt]
#   EVAL_MAX_TOKENS [3072]  PREP_WORKERS [8]
#   SWAP [calibrated] | plain   the swap: the README's recommended recipe (calibrate stage, then finetune from its
#             checkpoint with t2r_qk and the maps' 8x learning rate; ahead of the paper's recipe at the same budget in
#             docs/RESULTS.md) or the paper's plain swap (no calibration; t2r map, one learning rate): docs/PAPER.md
#   CALIBRATE_STEPS [300] Adam steps per layer (0: the swap alone)   CALIBRATE_WAIT [3600] s a node other than
#             node 0 waits for its calibrated checkpoint   CALIBRATE_ARGS   extra tools.convert options, e.g.
#             "--calibrate-batches 8 --max-tokens 2048" (see python -m t2r_fairseq.tools.convert --help)
#   TRAIN_OVERRIDES / TEACHER_OVERRIDES / FINETUNE_OVERRIDES   extra hydra overrides, e.g. "model.dropout=0.2"
#   T2R_DATA_MIRROR, T2R_DATA_CHECKSUMS   read by data-prep/download.py (local mirror, checksum table)
# Slurm: recipes/slurm/wikitext103_lm.sbatch. Where each default comes from: recipes/configs/wikitext103_lm_*.yaml.
set -euo pipefail
RECIPE=wikitext103_lm DEFAULT_STAGES=prep,teacher,calibrate,finetune,eval
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
t2r_parse_args "$@"

TEACHER=${TEACHER:-download}
TEACHER_URL=${TEACHER_URL:-https://dl.fbaipublicfiles.com/fairseq/models/lm/adaptive_lm_wiki103.v2.tar.bz2}
TEACHER_ARCHIVE_DIR=adaptive_lm_wiki103.v2
TEACHER_CONFIG=wikitext103_lm_teacher FINETUNE_CONFIG=wikitext103_lm_finetune REF_WORLD=8
MAX_UPDATE=${MAX_UPDATE:-50000} WARMUP_UPDATES=${WARMUP_UPDATES:-4000} TEACHER_MAX_UPDATE=${TEACHER_MAX_UPDATE:-286000}
MAX_TOKENS=${MAX_TOKENS:-3072} TOKENS_PER_SAMPLE=${TOKENS_PER_SAMPLE:-512}
FEATURE_SIZE=${FEATURE_SIZE:-32} LAYERS=${LAYERS:-16}
EVAL_TOKENS_PER_SAMPLE=${EVAL_TOKENS_PER_SAMPLE:-512} EVAL_CONTEXT_WINDOW=${EVAL_CONTEXT_WINDOW:-480}
if [[ ${TEACHER:-download} == download ]]; then  # the public teacher was trained on 3072-token blocks
  TEACHER_EVAL_TOKENS_PER_SAMPLE=${TEACHER_EVAL_TOKENS_PER_SAMPLE:-3072} TEACHER_EVAL_CONTEXT_WINDOW=${TEACHER_EVAL_CONTEXT_WINDOW:-2560}
else                                             # a teacher trained here: the same window as the T2R model
  TEACHER_EVAL_TOKENS_PER_SAMPLE=${TEACHER_EVAL_TOKENS_PER_SAMPLE:-$EVAL_TOKENS_PER_SAMPLE}
  TEACHER_EVAL_CONTEXT_WINDOW=${TEACHER_EVAL_CONTEXT_WINDOW:-$EVAL_CONTEXT_WINDOW}
fi
for v in MAX_UPDATE WARMUP_UPDATES TEACHER_MAX_UPDATE MAX_TOKENS TOKENS_PER_SAMPLE FEATURE_SIZE LAYERS \
         EVAL_TOKENS_PER_SAMPLE EVAL_CONTEXT_WINDOW TEACHER_EVAL_TOKENS_PER_SAMPLE TEACHER_EVAL_CONTEXT_WINDOW; do
  [[ ${!v} =~ ^[0-9]+$ ]] || t2r_die "$v must be a non-negative integer (got '${!v}')"
done
(( EVAL_CONTEXT_WINDOW < EVAL_TOKENS_PER_SAMPLE )) || t2r_die "EVAL_CONTEXT_WINDOW ($EVAL_CONTEXT_WINDOW) must be smaller than EVAL_TOKENS_PER_SAMPLE ($EVAL_TOKENS_PER_SAMPLE)"
(( TEACHER_EVAL_CONTEXT_WINDOW < TEACHER_EVAL_TOKENS_PER_SAMPLE )) || t2r_die "TEACHER_EVAL_CONTEXT_WINDOW must be smaller than TEACHER_EVAL_TOKENS_PER_SAMPLE"
case $TEACHER in download|train) ;; *) t2r_die "TEACHER must be 'download' or 'train' (got '$TEACHER')";; esac

DATA=$WORK/data BIN=$WORK/data-bin PUBLIC=$WORK/teacher/public
TEACHER_DIR=$WORK/checkpoints/teacher T2R_DIR=$WORK/checkpoints/t2r
[[ $TEACHER == train ]] && TEACHER_CKPT=${TEACHER_CKPT:-$TEACHER_DIR/checkpoint_best.pt}
teacher_ckpt() {
  [[ -n ${TEACHER_CKPT:-} ]] && return 0
  TEACHER_CKPT=$(t2r_find_in "$PUBLIC" model.pt "$TEACHER_ARCHIVE_DIR") || exit 2
}
# The architecture both models share (a swap needs identical shapes) and the training block length.
ARCH=(model.decoder_layers="$LAYERS" task.tokens_per_sample="$TOKENS_PER_SAMPLE")

if t2r_is_rank0 && t2r_stage prep "$DATA" "$BIN"; then
  dict=()
  if [[ $TEACHER == download ]]; then
    t2r_fetch_archive "$TEACHER_URL" "$PUBLIC" "${TEACHER_SHA256:-}"
    dict=(--srcdict "$(t2r_find_in "$PUBLIC" dict.txt "$TEACHER_ARCHIVE_DIR")")
  fi
  t2r_run bash "$T2R_ROOT/data-prep/wikitext103.sh" --out "$DATA" --raw "$WORK/raw"
  t2r_need "$DATA/DONE" "data-prep/wikitext103.sh did not finish"
  t2r_run_to "$WORK/logs/preprocess.log" "$FAIRSEQ_BIN/fairseq-preprocess" --only-source \
    --trainpref "$DATA/wiki.train.tokens" --validpref "$DATA/wiki.valid.tokens" --testpref "$DATA/wiki.test.tokens" \
    --destdir "$BIN" "${dict[@]}" --workers "${PREP_WORKERS:-8}"
  t2r_mark prep
fi

if t2r_stage teacher "$TEACHER_DIR" "$WORK/logs/teacher.log"; then
  if [[ $TEACHER == download ]]; then
    t2r_fetch_archive "$TEACHER_URL" "$PUBLIC" "${TEACHER_SHA256:-}"
    teacher_ckpt
  else
    extra=() more=()
    t2r_split extra "${TRAIN_OVERRIDES:-}"; t2r_split more "${TEACHER_OVERRIDES:-}"
    t2r_train teacher "$TEACHER_CONFIG" "$TEACHER_DIR" "$WORK/logs/teacher.log" \
      task.data="$BIN" "${ARCH[@]}" optimization.max_update="$TEACHER_MAX_UPDATE" dataset.max_tokens="$MAX_TOKENS" \
      "optimization.update_freq=[$(t2r_update_freq "$TEACHER_CONFIG" "$REF_WORLD")]" "${extra[@]}" "${more[@]}"
  fi
  t2r_mark teacher
fi

need_teacher() {
  [[ $TEACHER == download && -z ${TEACHER_CKPT:-} && ! -d $PUBLIC && $DRY_RUN == 0 ]] && t2r_die "no teacher yet: run the teacher stage first"
  teacher_ckpt
}

# The calibrate stage: one process (node 0), tools.convert on the teacher -> $CALIBRATED (lib.sh, t2r_calibrate).
if ! t2r_calibrate_plain && ! t2r_calibrate_elsewhere && t2r_stage calibrate "$CALIBRATED" "$WORK/logs/calibrate.log"; then
  need_teacher
  t2r_calibrate "$TEACHER_CKPT"
fi

if t2r_stage finetune "$T2R_DIR" "$WORK/logs/finetune.log"; then
  if [[ $SWAP == plain ]]; then need_teacher; fi
  t2r_finetune_start "${TEACHER_CKPT:-}"
  period=$(( MAX_UPDATE > WARMUP_UPDATES ? MAX_UPDATE - WARMUP_UPDATES : 1 ))
  extra=() more=()
  t2r_split extra "${TRAIN_OVERRIDES:-}"; t2r_split more "${FINETUNE_OVERRIDES:-}"
  t2r_train finetune "$FINETUNE_CONFIG" "$T2R_DIR" "$WORK/logs/finetune.log" \
    task.data="$BIN" checkpoint.finetune_from_model="$START" "${SWAP_OVERRIDES[@]}" "${ARCH[@]}" model.feature_size="$FEATURE_SIZE" \
    optimization.max_update="$MAX_UPDATE" lr_scheduler.warmup_updates="$WARMUP_UPDATES" \
    lr_scheduler.lr_period_updates="$period" dataset.max_tokens="$MAX_TOKENS" \
    "optimization.update_freq=[$(t2r_update_freq "$FINETUNE_CONFIG" "$REF_WORLD")]" "${extra[@]}" "${more[@]}"
  t2r_mark finetune
fi

# --required-batch-size-multiple 1: fairseq 0.12 drops a last batch smaller than the multiple (default 8),
# which would leave blocks of the evaluated split unscored (fairseq issue #5036). --distributed-world-size 1:
# its default is the number of visible GPUs, and eval-lm would then spawn one worker per GPU, each scoring
# only its shard, and report the perplexity of shard 0.
if t2r_is_rank0 && t2r_stage eval "$WORK/eval"; then
  cpu=()
  [[ $CPU == 1 ]] && cpu=(--cpu)
  for name in ${EVAL_MODELS:-teacher t2r}; do
    case $name in
      teacher) teacher_ckpt; ckpt=$TEACHER_CKPT tps=$TEACHER_EVAL_TOKENS_PER_SAMPLE ctx=$TEACHER_EVAL_CONTEXT_WINDOW;;
      t2r) ckpt=$T2R_DIR/${EVAL_CHECKPOINT:-checkpoint_best.pt} tps=$EVAL_TOKENS_PER_SAMPLE ctx=$EVAL_CONTEXT_WINDOW;;
      *) t2r_die "EVAL_MODELS: unknown model '$name' (valid: teacher t2r)";;
    esac
    t2r_need "$ckpt" "train it first (stages teacher/finetune)"
    for subset in ${EVAL_SUBSETS:-valid test}; do
      log=$WORK/eval/$name.$subset.eval-lm.txt
      t2r_run_to "$log" "$FAIRSEQ_BIN/fairseq-eval-lm" "$BIN" --user-dir "$T2R_USER_DIR" --path "$ckpt" \
        --gen-subset "$subset" --tokens-per-sample "$tps" --context-window "$ctx" \
        --max-tokens "${EVAL_MAX_TOKENS:-3072}" --softmax-batch 1024 --required-batch-size-multiple 1 \
        --distributed-world-size 1 "${cpu[@]}"
      if [[ $DRY_RUN == 0 ]]; then
        ppl=$(grep -o "Perplexity: [0-9.]*" "$log" | tail -n 1) || t2r_die "no perplexity in $log"
        echo "$RECIPE $name $subset: $ppl (tokens per sample $tps, context window $ctx)" | tee -a "$WORK/eval/perplexity.txt"
      fi
    done
  done
  t2r_mark eval
fi
