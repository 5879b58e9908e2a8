#!/usr/bin/env bash
# T2R end to end on CPU in minutes: data -> softmax teachers -> swap-then-finetune -> evaluate -> report.
#
#   bash recipes/quickstart.sh [--out DIR] [--lm-data DIR] [--mt-data DIR --src en --tgt de]
#                              [--lm-splits OUT=IN,...] [--mt-splits OUT=IN,...]
#                              [--stages data,teacher,finetune,eval,speed,report] [--force] [--tiny]
#
# Default data: a corpus generated offline by data-prep/toy_corpus.py (grammar-generated English and an
# invented SOV target language). Your own raw text: --lm-data DIR with train.txt/valid.txt/test.txt,
# --mt-data DIR with train.SRC/train.TGT, valid.*, test.* (e.g. Multi30k). Both are sentencepiece-encoded
# and binarised with fairseq-preprocess. Other split names: --mt-splits train=train,valid=val,test=test_2016_flickr
# (Multi30k), --lm-splits train=valid,valid=test,test=test (WikiText-2 without its train split).
# Finished stages are skipped (delete or --force to redo); everything lands under --out (default runs/quickstart).
# Budgets: QS_TEACHER_UPDATES, QS_FINETUNE_UPDATES. Compared models: QS_MODELS (default "t2r t2r_paper elu t2r_scratch":
# t2r = the recommended recipe (tools.convert: swap to the plugin's default map t2r_qk, the learned T2R map with its own
# layer for the keys, + feature maps calibrated to the teacher's attention, then
# finetuning with --feature-map-lr-scale 8 and, for MT, fairseq's softmax cross-attention kept
# (--softmax-cross-attention: decoder self-attention swapped) and the lr annealed to 0),
# t2r_paper = the paper's (its tied map t2r, finetuned straight from the teacher, --feature-map-lr-scale 1, MT
# cross-attention k = 32);
# also available: rfa, performer, hedgehog (swap-finetune with that map), t2r_scratch_long (from scratch, teacher budget),
# <map>_at_mse / <map>_at_ce (e.g. t2r_at_mse, hedgehog_at_ce: attention transfer with that loss for QS_TRANSFER_UPDATES
# (default a third of the finetune budget), then the task loss + QS_TRANSFER_WEIGHT (default 0) x transfer; same total updates)).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=runs/quickstart LM_DATA="" MT_DATA="" SRC=en TGT=xx STAGES=data,teacher,finetune,eval,speed,report FORCE=0 TINY=0
LM_SPLITS=train=train,valid=valid,test=test MT_SPLITS=train=train,valid=valid,test=test
while [[ $# -gt 0 ]]; do
  case $1 in
    --out) OUT=$2; shift 2;; --lm-data) LM_DATA=$2; shift 2;; --mt-data) MT_DATA=$2; shift 2;;
    --src) SRC=$2; shift 2;; --tgt) TGT=$2; shift 2;; --stages) STAGES=$2; shift 2;;
    --lm-splits) LM_SPLITS=$2; shift 2;; --mt-splits) MT_SPLITS=$2; shift 2;;
    --force) FORCE=1; shift;; --tiny) TINY=1; shift;;
    -h|--help) sed -n '2,23p' "$0"; exit 0;;
    *) echo "quickstart: unknown option $1 (see --help)" >&2; exit 2;;
  esac
done
if [[ -x $ROOT/.venv/bin/python ]]; then export PATH=$ROOT/.venv/bin:$PATH; fi
command -v fairseq-train >/dev/null || { echo "quickstart: fairseq not found; run 'bash scripts/setup.sh' first" >&2; exit 1; }
mkdir -p "$OUT"/{train,eval}
OUT=$(cd "$OUT" && pwd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONWARNINGS=ignore
has_stage() { [[ ",$STAGES," == *",$1,"* ]]; }
done_or_force() { [[ $FORCE == 0 && -e $1 ]]; }
say() { echo; echo "=== [quickstart] $*"; }

if [[ $TINY == 1 ]]; then
  TEACHER_UPDATES=${QS_TEACHER_UPDATES:-20} FINETUNE_UPDATES=${QS_FINETUNE_UPDATES:-10} NTRAIN=600 NVALID=100 VOCAB=200
  DIM=32 FFN=64 LAYERS=2 HEADS=4 FEAT=8 SPEED_LENGTHS=16,64 MAXTOK=2048 CAL_STEPS=30
  GEN_LEN=(--max-len-a 1.2 --max-len-b 10)  # barely trained models would otherwise generate 200 tokens a sentence
else
  TEACHER_UPDATES=${QS_TEACHER_UPDATES:-400} FINETUNE_UPDATES=${QS_FINETUNE_UPDATES:-150} NTRAIN=20000 NVALID=1000 VOCAB=${QS_VOCAB:-1000}
  DIM=128 FFN=512 LAYERS=3 HEADS=4 FEAT=32 SPEED_LENGTHS=64,256,1024,2048 MAXTOK=4096 CAL_STEPS=300 GEN_LEN=()
fi
MODELS=${QS_MODELS:-t2r t2r_paper elu t2r_scratch}
TRANSFER_UPDATES=${QS_TRANSFER_UPDATES:-$((FINETUNE_UPDATES / 3))} TRANSFER_WEIGHT=${QS_TRANSFER_WEIGHT:-0}
COMMON=(--optimizer adam --adam-betas "(0.9,0.98)" --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 50
        --clip-norm 1.0 --max-tokens $MAXTOK --cpu --seed 1 --log-format simple --log-interval 25
        --no-epoch-checkpoints --num-workers 0 --user-dir "$ROOT/t2r_fairseq")
LM_ARCH=(--task language_modeling --tokens-per-sample 128 --max-target-positions 4096 --decoder-layers $LAYERS
         --decoder-embed-dim $DIM --decoder-input-dim $DIM --decoder-output-dim $DIM --decoder-ffn-embed-dim $FFN
         --decoder-attention-heads $HEADS --share-decoder-input-output-embed --dropout 0.1)
MT_ARCH=(--task translation -s "$SRC" -t "$TGT" --encoder-layers $LAYERS --decoder-layers $LAYERS
         --encoder-embed-dim $DIM --decoder-embed-dim $DIM --encoder-ffn-embed-dim $FFN --decoder-ffn-embed-dim $FFN
         --encoder-attention-heads $HEADS --decoder-attention-heads $HEADS --share-all-embeddings --dropout 0.1
         --max-target-positions 4096 --criterion label_smoothed_cross_entropy --label-smoothing 0.1)

# ---- data ---------------------------------------------------------------------------------------------
if has_stage data; then
  if done_or_force "$OUT/data-bin/mt/preprocess.log"; then say "data: done (skipping)"; else
    say "data"
    rm -rf "$OUT/data"
    if [[ -z $LM_DATA || -z $MT_DATA ]]; then
      python "$ROOT/data-prep/toy_corpus.py" "$OUT/data/toy" --train $NTRAIN --valid $NVALID
    fi
    LM_RAW=${LM_DATA:-$OUT/data/toy/lm}; MT_RAW=${MT_DATA:-$OUT/data/toy/mt}
    python "$ROOT/data-prep/spm_encode.py" --kind lm --in-dir "$LM_RAW" --out-dir "$OUT/data/lm-spm" --vocab-size $VOCAB --splits "$LM_SPLITS"
    python "$ROOT/data-prep/spm_encode.py" --kind mt --in-dir "$MT_RAW" --out-dir "$OUT/data/mt-spm" --src "$SRC" --tgt "$TGT" --vocab-size $VOCAB --splits "$MT_SPLITS"
    rm -rf "$OUT/data-bin"
    fairseq-preprocess --only-source --trainpref "$OUT/data/lm-spm/train.txt" --validpref "$OUT/data/lm-spm/valid.txt" \
      --testpref "$OUT/data/lm-spm/test.txt" --destdir "$OUT/data-bin/lm" --workers 2 > "$OUT/data/lm-preprocess.log"
    fairseq-preprocess -s "$SRC" -t "$TGT" --joined-dictionary --trainpref "$OUT/data/mt-spm/train" \
      --validpref "$OUT/data/mt-spm/valid" --testpref "$OUT/data/mt-spm/test" --destdir "$OUT/data-bin/mt" --workers 2 > "$OUT/data/mt-preprocess.log"
  fi
fi

train() {  # train NAME KIND UPDATES ARCH [extra fairseq-train args...]
  local name=$1 kind=$2 updates=$3 arch=$4; shift 4
  local save="$OUT/checkpoints/$name.$kind" log="$OUT/train/$name.$kind.log"
  if done_or_force "$save/checkpoint_last.pt" && grep -q "done training" "$log" 2>/dev/null; then say "train $name ($kind): done (skipping)"; return; fi
  say "train $name ($kind, $updates updates) -> $log"
  rm -rf "$save"
  local arch_args=("${LM_ARCH[@]}"); [[ $kind == mt ]] && arch_args=("${MT_ARCH[@]}")
  fairseq-train "$OUT/data-bin/$kind" --arch "$arch" "${arch_args[@]}" "${COMMON[@]}" --max-update "$updates" \
    --save-dir "$save" "$@" 2>&1 | tee "$log" | grep --line-buffered -E "\| (epoch|train|valid) |T2R swap|done training" || true
  grep -q "done training" "$log" || { echo "quickstart: training $name ($kind) failed, see $log" >&2; exit 1; }
}

convert() {  # convert NAME KIND MAP [tools.convert args...]: the swap + calibration of the recommended recipe -> the checkpoint path
  local name=$1 kind=$2 map=$3 out="$OUT/checkpoints/$1.$2.swapped.pt" log="$OUT/train/$1.$2.convert.log"
  shift 3
  if ! done_or_force "$out"; then
    say "convert $name ($kind): swap + feature maps calibrated to the teacher's attention -> $log" >&2
    python -m t2r_fairseq.tools.convert "$OUT/checkpoints/teacher.$kind/checkpoint_last.pt" "$out" \
      --data "$OUT/data-bin/$kind" --feature-map "$map" --feature-size $FEAT --calibrate-steps $CAL_STEPS \
      --max-tokens $MAXTOK "$@" > "$log" 2>&1 || { echo "quickstart: conversion of $name ($kind) failed, see $log" >&2; exit 1; }
    grep -E "T2R swap|calibration" "$log" | sed 's/^.*| //' >&2
  fi
  echo "$out"
}

# ---- teachers and T2R models --------------------------------------------------------------------------
if has_stage teacher; then
  train teacher lm "$TEACHER_UPDATES" transformer_lm
  train teacher mt "$TEACHER_UPDATES" transformer
fi
if has_stage finetune; then
  for kind in lm mt; do
    t2r_arch=t2r_transformer_lm; [[ $kind == mt ]] && t2r_arch=t2r_transformer
    # the paper's cross-attention map has --feature-size features; the recommended recipe keeps fairseq's softmax
    # cross-attention (within 0.3 BLEU of the teacher finetuned the same way, where the all-linear model was behind)
    paper_k=(); [[ $kind == mt ]] && paper_k=(--cross-feature-size $FEAT)
    cross=(); [[ $kind == mt ]] && cross=(--softmax-cross-attention)
    teacher="$OUT/checkpoints/teacher.$kind/checkpoint_last.pt"
    for name in $MODELS; do
      case $name in
        t2r_scratch) train "$name" "$kind" "$FINETUNE_UPDATES" $t2r_arch --feature-map t2r --feature-size $FEAT;;
        t2r_scratch_long) train "$name" "$kind" "$TEACHER_UPDATES" $t2r_arch --feature-map t2r --feature-size $FEAT;;
        t2r)  # the recommended recipe (translation: the learning rate decays linearly to 0 at the last update)
          swapped=$(convert "$name" "$kind" t2r_qk "${cross[@]}")
          anneal=(); [[ $kind == mt ]] && anneal=(--lr-scheduler polynomial_decay --total-num-update "$FINETUNE_UPDATES" --end-learning-rate 0)
          train "$name" "$kind" "$FINETUNE_UPDATES" $t2r_arch --feature-map t2r_qk --feature-size $FEAT \
            --feature-map-lr-scale 8 --finetune-from-model "$swapped" "${anneal[@]}" "${cross[@]}";;
        t2r_paper)
          train "$name" "$kind" "$FINETUNE_UPDATES" $t2r_arch --feature-map t2r --feature-size $FEAT "${paper_k[@]}" \
            --feature-map-lr-scale 1 --finetune-from-model "$teacher";;
        elu|rfa|performer|hedgehog)  # swap-then-finetune as the paper, with that map
          train "$name" "$kind" "$FINETUNE_UPDATES" $t2r_arch --feature-map "$name" --feature-size $FEAT "${paper_k[@]}" \
            --finetune-from-model "$teacher";;
        *_at_mse|*_at_ce)  # <map>_at_<loss>: attention transfer, then task finetuning, same total updates
          loss=output_mse; [[ $name == *_ce ]] && loss=attention_ce
          smoothing=0; [[ $kind == mt ]] && smoothing=0.1
          train "$name" "$kind" "$FINETUNE_UPDATES" $t2r_arch --feature-map "${name%_at_*}" --feature-size $FEAT \
            "${paper_k[@]}" --finetune-from-model "$teacher" --criterion t2r_attention_transfer --transfer-loss $loss \
            --label-smoothing $smoothing --transfer-only-updates "$TRANSFER_UPDATES" --transfer-weight "$TRANSFER_WEIGHT";;
        *) echo "quickstart: unknown model '$name' in QS_MODELS" >&2; exit 2;;
      esac
    done
  done
fi

# ---- evaluation -----------------------------------------------------------------------------------------
if has_stage eval; then
  for name in teacher $MODELS; do
    ck="$OUT/checkpoints/$name"
    if ! done_or_force "$OUT/eval/$name.lm.log" || ! grep -q Perplexity "$OUT/eval/$name.lm.log"; then
      say "eval-lm $name"
      fairseq-eval-lm "$OUT/data-bin/lm" --user-dir "$ROOT/t2r_fairseq" --path "$ck.lm/checkpoint_last.pt" --cpu \
        --tokens-per-sample 128 --max-tokens 4096 --required-batch-size-multiple 1 --gen-subset test > "$OUT/eval/$name.lm.log" 2>&1
      grep Perplexity "$OUT/eval/$name.lm.log"
    fi
    if ! done_or_force "$OUT/eval/$name.mt.log" || ! grep -q "sacreBLEU = " "$OUT/eval/$name.mt.log"; then
      say "generate $name (beam 4, sacreBLEU on detokenised sentencepiece output)"
      fairseq-generate "$OUT/data-bin/mt" --user-dir "$ROOT/t2r_fairseq" --path "$ck.mt/checkpoint_last.pt" --cpu \
        --beam 4 --max-tokens 4096 --required-batch-size-multiple 1 --gen-subset test --post-process sentencepiece "${GEN_LEN[@]}" \
        --scoring sacrebleu --distributed-world-size 1 > "$OUT/eval/$name.mt.log" 2>&1
      python -m t2r_fairseq.tools.sacrebleu_from_generate "$OUT/eval/$name.mt.log" | tee -a "$OUT/eval/$name.mt.log"
    fi
  done
fi

if has_stage speed; then
  for b in 1 16; do
    if done_or_force "$OUT/eval/speed_lm_b$b.json"; then continue; fi
    say "decode speed and state size, LM, batch $b, contexts $SPEED_LENGTHS"
    python -m t2r_fairseq.tools.decode_speed --data "$OUT/data-bin/lm" --lengths "$SPEED_LENGTHS" --batch $b \
      --path "softmax=$OUT/checkpoints/teacher.lm/checkpoint_last.pt" --path "t2r=$OUT/checkpoints/t2r.lm/checkpoint_last.pt" \
      --out "$OUT/eval/speed_lm_b$b.json"
  done
fi

if has_stage report; then
  say "report"
  python -m t2r_fairseq.tools.quickstart_report "$OUT"
fi
