#!/usr/bin/env bash
# The accuracy study of docs/RESULTS.md: converged softmax teachers on real corpora, then swap-then-finetune
# curves for every attention variant at the same budget, evaluated at intermediate checkpoints.
#
#   bash recipes/accuracy_study.sh --multi30k DIR --wikitext2 DIR [--out runs/study] [--stages ...] [--rows ...]
#
# --multi30k DIR   raw Multi30k task 1 (train/val/test_2016_flickr/test_2017_flickr .en/.de)
# --wikitext2 DIR  WikiText-2 valid.txt/test.txt (no train split: train/dev are cut from valid.txt by article,
#                  see data-prep/wikitext2_split.py; test.txt is only ever used for the final numbers)
# --stages         comma list of data,teacher,finetune,eval,report (default: all)
# --rows           comma list of finetune rows (default: all; see ROWS below); ROW_s<N> reruns ROW with seed N,
#                  ROW_ftlr<LR> with peak finetuning learning rate LR (default FT_LR=5e-4); _cal<N> in place of _cal
#                  calibrates for N steps instead of CAL_STEPS=300
# --tasks          lm,mt (default both)
# --device         cpu (default) or cuda: training, calibration and evaluation on the GPU (fp32)
# --size           small (default: the 2-core study, d=128) or base (6+6 / 6 layers, d=512, 8 heads, dropout 0.3:
#                  the same comparison at transformer-base size, for a GPU)
# Teachers train until dev loss has not improved for $PATIENCE validations ($VALID_EVERY updates apart);
# checkpoint_best.pt is the teacher; TEACHER_HOURS > 0 also stops it cleanly (validated and saved) after that much
# training time (fairseq's --stop-time-hours: a fixed GPU budget), its cost then being the updates it ran.
# Each finetune row runs FT_UPDATES updates (default: 20% of the updates its teacher's training ran, early stopping
# included; FT_UPDATES_LM / FT_UPDATES_MT override it per task) and saves a checkpoint every eighth of it, so one run
# gives the whole curve.
# EVAL_END_ONLY=1: the eval stage scores only each row's end-of-budget checkpoint (a later plain eval adds the curve).
# Threads: OMP_NUM_THREADS (default 2). Everything lands under --out; finished steps are skipped.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=runs/study M30K="" WT2="" STAGES=data,teacher,finetune,eval,report ROWS_ARG="" TASKS=lm,mt DEVICE=cpu SIZE=small
while [[ $# -gt 0 ]]; do
  case $1 in
    --out) OUT=$2; shift 2;; --multi30k) M30K=$2; shift 2;; --wikitext2) WT2=$2; shift 2;;
    --stages) STAGES=$2; shift 2;; --rows) ROWS_ARG=$2; shift 2;; --tasks) TASKS=$2; shift 2;;
    --device) DEVICE=$2; shift 2;; --size) SIZE=$2; shift 2;;
    -h|--help) sed -n '2,25p' "$0"; exit 0;;
    *) echo "accuracy_study: unknown option $1 (see --help)" >&2; exit 2;;
  esac
done
case $DEVICE in cpu) DEV=(--cpu);; cuda) DEV=();; *) echo "accuracy_study: --device must be cpu or cuda, not '$DEVICE'" >&2; exit 2;; esac
[[ $SIZE == small || $SIZE == base ]] || { echo "accuracy_study: --size must be small or base, not '$SIZE'" >&2; exit 2; }
if [[ -x $ROOT/.venv/bin/python ]]; then export PATH=$ROOT/.venv/bin:$PATH; fi
command -v fairseq-train >/dev/null || { echo "accuracy_study: fairseq not found; run 'bash scripts/setup.sh' first" >&2; exit 1; }
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONWARNINGS=ignore
has() { [[ ",$2," == *",$1,"* ]]; }
say() { echo "=== [study $(date +%H:%M:%S)] $*"; }

# ---- fixed setup (see docs/RESULTS.md) -------------------------------------------------------------------
SEED=${SEED:-1} VOCAB=${VOCAB:-6000} VALID_EVERY=${VALID_EVERY:-100} PATIENCE=${PATIENCE:-5}
TEACHER_MAX=${TEACHER_MAX:-4000} TEACHER_HOURS=${TEACHER_HOURS:-0}
COMMON=(--optimizer adam --adam-betas "(0.9,0.98)" --clip-norm 1.0 --max-tokens 4096 "${DEV[@]}"
        --log-format simple --log-interval 25 --num-workers 0 --user-dir "$ROOT/t2r_fairseq" --no-epoch-checkpoints)
# --size: small = the 2-core study's models; base = transformer-base dimensions (a GPU's)
if [[ $SIZE == base ]]; then LM_LAYERS=6 MT_LAYERS=6 DIM=512 FFN=2048 HEADS=8 DROPOUT=0.3
else LM_LAYERS=4 MT_LAYERS=3 DIM=128 FFN=512 HEADS=4 DROPOUT=0.2; fi
LM_ARCH=(--task language_modeling --tokens-per-sample 256 --decoder-layers $LM_LAYERS --decoder-embed-dim $DIM
         --decoder-ffn-embed-dim $FFN --decoder-attention-heads $HEADS --share-decoder-input-output-embed --dropout $DROPOUT)
MT_ARCH=(--task translation -s en -t de --encoder-layers $MT_LAYERS --decoder-layers $MT_LAYERS --encoder-embed-dim $DIM
         --decoder-embed-dim $DIM --encoder-ffn-embed-dim $FFN --decoder-ffn-embed-dim $FFN --encoder-attention-heads $HEADS
         --decoder-attention-heads $HEADS --share-all-embeddings --dropout $DROPOUT
         --criterion label_smoothed_cross_entropy --label-smoothing 0.1)
# base: a post-norm 6+6 d=512 transformer diverges at the small model's 1.5e-3 (seen on Multi30k: training loss 9.2 at update 568, where 5e-4 had 6.6)
TEACHER_LR=${TEACHER_LR:-$([[ $SIZE == base ]] && echo 5e-4 || echo 1.5e-3)}
TEACHER_WARMUP=${TEACHER_WARMUP:-$([[ $SIZE == base ]] && echo 1000 || echo 300)}
TEACHER_OPT=(--lr "$TEACHER_LR" --lr-scheduler inverse_sqrt --warmup-updates "$TEACHER_WARMUP")

# ---- data --------------------------------------------------------------------------------------------------
if has data "$STAGES"; then
  if has mt "$TASKS" && [[ ! -e $OUT/data-bin/mt/dict.de.txt ]]; then
    [[ -n $M30K ]] || { echo "accuracy_study: --multi30k DIR is required for the data stage" >&2; exit 2; }
    say "data: Multi30k EN-DE (sentencepiece $VOCAB joint)"
    python "$ROOT/data-prep/spm_encode.py" --kind mt --in-dir "$M30K" --out-dir "$OUT/data/mt-spm" --src en --tgt de \
      --vocab-size "$VOCAB" --splits train=train,valid=val,test=test_2016_flickr,test1=test_2017_flickr
    fairseq-preprocess -s en -t de --joined-dictionary --trainpref "$OUT/data/mt-spm/train" \
      --validpref "$OUT/data/mt-spm/valid" --testpref "$OUT/data/mt-spm/test,$OUT/data/mt-spm/test1" \
      --destdir "$OUT/data-bin/mt" --workers 2 > "$OUT/data/mt-preprocess.log"
  fi
  if has lm "$TASKS" && [[ ! -e $OUT/data-bin/lm/dict.txt ]]; then
    [[ -n $WT2 ]] || { echo "accuracy_study: --wikitext2 DIR is required for the data stage" >&2; exit 2; }
    say "data: WikiText-2 (train/dev cut from valid.txt, test = test.txt; sentencepiece $VOCAB)"
    python "$ROOT/data-prep/wikitext2_split.py" "$WT2" "$OUT/data/lm-raw"
    python "$ROOT/data-prep/spm_encode.py" --kind lm --in-dir "$OUT/data/lm-raw" --out-dir "$OUT/data/lm-spm" \
      --vocab-size "$VOCAB"
    fairseq-preprocess --only-source --trainpref "$OUT/data/lm-spm/train.txt" --validpref "$OUT/data/lm-spm/valid.txt" \
      --testpref "$OUT/data/lm-spm/test.txt" --destdir "$OUT/data-bin/lm" --workers 2 > "$OUT/data/lm-preprocess.log"
  fi
fi

arch_args() { if [[ $1 == lm ]]; then echo "${LM_ARCH[@]}"; else echo "${MT_ARCH[@]}"; fi; }
teacher_arch() { if [[ $1 == lm ]]; then echo transformer_lm; else echo transformer; fi; }  # the T2R arch: t2r_ + this

# ---- teachers ----------------------------------------------------------------------------------------------
if has teacher "$STAGES"; then
  for kind in lm mt; do
    has $kind "$TASKS" || continue
    save=$OUT/checkpoints/teacher.$kind log=$OUT/train/teacher.$kind.log
    if grep -q "done training" "$log" 2>/dev/null; then say "teacher $kind: done"; continue; fi
    mkdir -p "$OUT/train"; arch=$(teacher_arch $kind)
    say "teacher $kind -> $log"
    # shellcheck disable=SC2046
    fairseq-train "$OUT/data-bin/$kind" --arch $arch $(arch_args $kind) "${COMMON[@]}" --seed "$SEED" "${TEACHER_OPT[@]}" \
      --max-update "$TEACHER_MAX" --validate-interval-updates "$VALID_EVERY" --save-interval-updates "$VALID_EVERY" \
      --keep-interval-updates 1 --patience "$PATIENCE" --stop-time-hours "$TEACHER_HOURS" --save-dir "$save" >> "$log" 2>&1   # rerun: resumes, log appended
  done
fi

# ---- finetune rows -------------------------------------------------------------------------------------------
# Every row starts from `python -m t2r_fairseq.tools.convert` on the teacher (the swap, plus the calibration of the
# feature maps to the teacher's attention for the *_cal rows): that checkpoint is the curve's point at 0 updates.
# Then FT_UPDATES updates of plain task finetuning with the same schedule for every row.
ALL_ROWS="t2r elu performer rfa hedgehog t2r_lr8 t2r_cal t2r_cal_lr8 hedgehog_cal t2r_cal_lr8_k64 selfonly_t2r_cal_lr8 hybrid4_t2r_cal_lr8"
ROWS=${ROWS_ARG//,/ }; ROWS=${ROWS:-$ALL_ROWS}
FT_LR=${FT_LR:-5e-4} CAL_STEPS=${CAL_STEPS:-300}
row_args() {  # row kind -> CONVERT_ARGS, FT_ARGS, ROW_SEED; a trailing _s<N> reruns a row with seed N (seed variance)
  local row=$1 kind=$2 map=t2r feat=32 cal=0 lrs=1
  ROW_SEED=$SEED; [[ $row =~ _s([0-9]+)$ ]] && ROW_SEED=${BASH_REMATCH[1]}
  case $row in *hedgehog*) map=hedgehog;; *performer*) map=performer;; *elu*) map=elu;; *rfa*) map=rfa;; *t2rqk*) map=t2r_qk;; esac
  [[ $row == *_cal* ]] && cal=$CAL_STEPS
  [[ $row =~ _cal([0-9]+)(_|$) ]] && cal=${BASH_REMATCH[1]}   # _cal<N>: N calibration steps instead of CAL_STEPS
  [[ $row == *_lr8* ]] && lrs=8
  [[ $row == *_k64* ]] && feat=64
  CONVERT_ARGS=(--feature-map $map --feature-size $feat --calibrate-steps $cal)
  FT_ARGS=(--feature-map $map --feature-size $feat --feature-map-lr-scale $lrs)
  # _xk<N> (MT): the encoder-decoder attention's own feature size N (where the all-linear gap is; self-attention keeps
  # $feat). Without it a row's cross-attention has $feat features, as the study measured the rows (spelled out: the
  # plugin's own default for it is 128, what _xk128 measured).
  if [[ $kind == mt ]]; then
    local xk=$feat; [[ $row =~ _xk([0-9]+)(_|$) ]] && xk=${BASH_REMATCH[1]}
    CONVERT_ARGS+=(--cross-feature-size "$xk"); FT_ARGS+=(--cross-feature-size "$xk")
  fi
  # Joint losses from the softmax teacher: _atce adds attention transfer (attention CE, weight 1), _kd word-level
  # distillation (task loss = 0.5 label-smoothed CE + 0.5 KL(teacher || model)).
  if [[ $row == *_atce* || $row == *_kd* ]]; then
    local tw=0 dw=0; [[ $row == *_atce* ]] && tw=1; [[ $row == *_kd* ]] && dw=0.5
    FT_ARGS+=(--criterion t2r_attention_transfer --transfer-loss attention_ce --transfer-weight $tw --distill-weight $dw
              --transfer-teacher "$OUT/checkpoints/teacher.$kind/checkpoint_best.pt")
  fi
  # _poly: lr decays linearly to 0 at the end of the budget (fairseq's polynomial_decay, as RoBERTa/BART finetuning)
  # instead of inverse_sqrt, which still runs at 1/sqrt(10) of its peak (the feature maps at 8x that) at the end.
  # _ftlr<LR>: this row's peak finetuning learning rate instead of FT_LR (e.g. t2r_cal_lr8_poly_ftlr1e-3)
  ROW_LR=$FT_LR; [[ $row =~ _ftlr([0-9.e-]+[0-9])(_|$) ]] && ROW_LR=${BASH_REMATCH[1]}
  SCHED=(--lr-scheduler inverse_sqrt)
  [[ $row == *_poly* ]] && SCHED=(--lr-scheduler polynomial_decay --total-num-update "$FT_UPDATES" --end-learning-rate 0)
  if [[ $row == selfonly_* ]]; then CONVERT_ARGS+=(--softmax-cross-attention); FT_ARGS+=(--softmax-cross-attention); fi
  # softmax*: the control row: the teacher itself (no swap) finetuned with the same schedule, which measures what the
  # finetuning budget alone adds to it (checkpoint_0.pt = the teacher)
  ROW_ARCH=t2r_$(teacher_arch $kind)
  if [[ $row == softmax* ]]; then ROW_ARCH=$(teacher_arch $kind); FT_ARGS=(); fi
  if [[ $row == hybrid* ]]; then
    local w=${row%%_*}; w=${w#hybrid}; [[ $kind == lm ]] && w=$((w * 8))   # MT W=4 (sentences ~20 pieces), LM W=32 (256-token blocks)
    CONVERT_ARGS+=(--sliding-window $w); FT_ARGS+=(--sliding-window $w)
  fi
}
teacher_updates() {  # updates the teacher's training ran (its cost), from its last checkpoint
  python -c "import sys, t2r_fairseq; from fairseq import checkpoint_utils as c; print(c.load_checkpoint_to_cpu(sys.argv[1])['optimizer_history'][-1]['num_updates'])" \
    "$OUT/checkpoints/teacher.$1/checkpoint_last.pt"
}
ft_updates() {  # 20% of the teacher's updates, rounded down to a multiple of 8 (the curve's points)
  local override; [[ $1 == lm ]] && override=${FT_UPDATES_LM:-} || override=${FT_UPDATES_MT:-}
  if [[ -n $override ]]; then echo "$override"; else echo $(( $(teacher_updates "$1") / 5 / 8 * 8 )); fi
}
if has finetune "$STAGES"; then
  for kind in lm mt; do
    has $kind "$TASKS" || continue
    teacher=$OUT/checkpoints/teacher.$kind/checkpoint_best.pt
    [[ -e $teacher ]] || { echo "accuracy_study: no teacher $teacher (run the teacher stage)" >&2; exit 1; }
    FT_UPDATES=$(ft_updates $kind) FT_SAVE_EVERY=$(( $(ft_updates $kind) / 8 ))
    for row in $ROWS; do
      [[ $kind == lm && $row == selfonly_* ]] && continue
      row_args "$row" "$kind"
      save=$OUT/checkpoints/$row.$kind log=$OUT/train/$row.$kind.log
      if grep -q "done training" "$log" 2>/dev/null; then say "finetune $row ($kind): done"; continue; fi
      mkdir -p "$save"
      if [[ $row == softmax* ]]; then cp "$teacher" "$save/checkpoint_0.pt"; else
        say "convert $row ($kind): ${CONVERT_ARGS[*]}"
        python -m t2r_fairseq.tools.convert "$teacher" "$save/checkpoint_0.pt" --data "$OUT/data-bin/$kind" \
          "${CONVERT_ARGS[@]}" --seed "$ROW_SEED" --device "$DEVICE" > "$OUT/train/$row.$kind.convert.log" 2>&1
      fi
      say "finetune $row ($kind, $FT_UPDATES updates): ${FT_ARGS[*]} -> $log"
      # shellcheck disable=SC2046
      fairseq-train "$OUT/data-bin/$kind" --arch $ROW_ARCH $(arch_args $kind) "${COMMON[@]}" --seed "$ROW_SEED" "${FT_ARGS[@]}" \
        --finetune-from-model "$save/checkpoint_0.pt" --lr "$ROW_LR" "${SCHED[@]}" \
        --warmup-updates $((FT_UPDATES / 10)) --max-update "$FT_UPDATES" --save-interval-updates "$FT_SAVE_EVERY" \
        --validate-interval-updates "$FT_SAVE_EVERY" --keep-interval-updates -1 --save-dir "$save" > "$log" 2>&1
    done
  done
fi

# ---- evaluation at 0, (1/8 for the LM), 1/4, 1/2 and all of the budget -----------------------------------------------------
# MT: beam 4, output length bounded by 1.2 x source + 10 (a swapped model without finetuning can otherwise run to
# the 200-token limit), detokenised sentencepiece output scored by sacreBLEU against the raw references; test =
# test_2016_flickr, test1 = test_2017_flickr, valid = val (for tuning: only at the end of the budget).
# LM: fairseq-eval-lm on test.txt with 256-token blocks (as trained).
evaluate() {  # evaluate NAME KIND CHECKPOINT POINT SUBSET
  local name=$1 kind=$2 ck=$3 point=$4 subset=$5 log=$OUT/eval/$1.$2.$4.$5.log tmp=$OUT/eval/$1.$2.$4.$5.$$.tmp
  if grep -q "Perplexity\|sacreBLEU = " "$log" 2>/dev/null; then return; fi
  mkdir -p "$OUT/eval"
  if [[ $kind == lm ]]; then
    fairseq-eval-lm "$OUT/data-bin/lm" --user-dir "$ROOT/t2r_fairseq" --path "$ck" "${DEV[@]}" --tokens-per-sample 256 \
      --max-tokens 8192 --required-batch-size-multiple 1 --gen-subset "$subset" > "$tmp" 2>&1
  else
    local ref=$M30K/$([[ $subset == test ]] && echo test_2016_flickr || ([[ $subset == test1 ]] && echo test_2017_flickr || echo val)).de
    fairseq-generate "$OUT/data-bin/mt" --user-dir "$ROOT/t2r_fairseq" --path "$ck" "${DEV[@]}" --beam 4 --max-tokens 8192 \
      --max-len-a 1.2 --max-len-b 10 --required-batch-size-multiple 1 --distributed-world-size 1 --gen-subset "$subset" \
      --post-process sentencepiece > "$tmp" 2>&1
    python -m t2r_fairseq.tools.sacrebleu_from_generate "$tmp" --ref "$ref" >> "$tmp"
  fi
  mv "$tmp" "$log"   # complete logs only (rows evaluated side by side may share the teacher's)
  say "eval $name $kind @$point $subset: $(grep -o "Perplexity: [0-9.]*\|sacreBLEU = [0-9.]*" "$log" | tail -1)"
}
if has eval "$STAGES"; then
  [[ -n $M30K ]] || ! has mt "$TASKS" || { echo "accuracy_study: --multi30k DIR is required for MT evaluation (references)" >&2; exit 2; }
  for kind in lm mt; do
    has $kind "$TASKS" || continue
    subsets=test; [[ $kind == mt ]] && subsets="test test1"
    for sub in $subsets; do evaluate teacher $kind "$OUT/checkpoints/teacher.$kind/checkpoint_best.pt" 0 $sub; done
    [[ $kind == mt ]] && evaluate teacher mt "$OUT/checkpoints/teacher.mt/checkpoint_best.pt" 0 valid
    B=$(ft_updates $kind)
    for row in $ROWS; do
      [[ -e $OUT/checkpoints/$row.$kind/checkpoint_0.pt ]] || continue
      # the end of the budget first: a run stopped early still has the number that matters
      points="$B 0 $((B / 8)) $((B / 4)) $((B / 2))"; [[ $kind == mt ]] && points="$B 0 $((B / 4)) $((B / 2))"
      [[ ${EVAL_END_ONLY:-0} == 1 ]] && points=$B   # every row's final number first; a later eval stage adds the curve
      for point in $points; do
        ck=$OUT/checkpoints/$row.$kind/checkpoint_0.pt
        [[ $point != 0 ]] && ck=$(ls "$OUT"/checkpoints/$row.$kind/checkpoint_*_$point.pt 2>/dev/null | head -1)
        [[ -n $ck && -e $ck ]] || continue
        for sub in $subsets; do evaluate $row $kind "$ck" $point $sub; done
        [[ $kind == mt && $point == "$B" ]] && evaluate $row mt "$ck" $point valid
      done
    done
  done
fi

if has report "$STAGES"; then
  python -m t2r_fairseq.tools.study_report "$OUT"
fi
