#!/usr/bin/env bash
# Shatter vs multi-head RoBERTa, small masked-LM study on WikiText-2 (docs/SHATTER.md).
# CORPUS=wikitext2 (default): train/dev cut from ../shared/data/wikitext-2/valid.txt (first 3400 lines / last 360);
# CORPUS=multi30k: ../shared/data/multi30k/train.en / val.en (English side). Test sets are never read.
# TASK=mt: translation instead (Multi30k EN-DE; variants multihead, shatter, shatter_t2r; see below).
# Usage: [SEED=1] [CORPUS=wikitext2] [TASK=mlm] recipes/shatter_study.sh [UPDATES] [VARIANTS...]   (logs and data under
# runs/shatter/, git-ignored; seed 1 on wikitext2 writes logs/VARIANT.log, otherwise logs/VARIANT[_seedN][_CORPUS].log)
set -euo pipefail
cd "$(dirname "$0")/.."
UPDATES=${1:-400}; shift || true
VARIANTS=${*:-"multihead shatter"}
PY=${PY:-.venv/bin}
R=runs/shatter
SEED=${SEED:-1}
SUFFIX_MT=$([ "$SEED" = 1 ] || echo "_seed$SEED")
if [ "${TASK:-mlm}" = mt ]; then
  # Translation, Multi30k EN-DE (raw captions, whitespace tokens): the same transformer with a multi-head or a
  # Shatter encoder (softmax decoder), BLEU of fairseq-generate on val (tokenized BLEU of fairseq's scorer, not
  # sacreBLEU: a relative comparison). test_2016/2017 are never read. STOP_HOURS > 0: fairseq's --stop-time-hours
# (training stops there, saved, whatever the update count).
  M=${MULTI30K:-../shared/data/multi30k}; D=$R/data-mt; mkdir -p "$R/logs" "$D"
  if [ ! -f "$D/bin/dict.en.txt" ]; then
    for l in en de; do cp "$M/train.$l" "$D/train.$l"; cp "$M/val.$l" "$D/valid.$l"; done
    nice -n 10 "$PY/fairseq-preprocess" -s en -t de --joined-dictionary --trainpref "$D/train" --validpref "$D/valid" \
      --destdir "$D/bin" --thresholdsrc 2 --thresholdtgt 2 --workers 1
  fi
  for v in $VARIANTS; do
    case $v in
      multihead) ARCH=(--arch shatter_transformer --encoder-attention multihead) ;;
      shatter) ARCH=(--arch shatter_transformer) ;;
      shatter_t2r) ARCH=(--arch t2r_transformer --encoder-attention shatter) ;;
      prepare) continue ;;
      *) echo "unknown variant $v (multihead, shatter, shatter_t2r, prepare)" >&2; exit 2 ;;
    esac
    start=$(date +%s)
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} nice -n 10 "$PY/fairseq-train" "$D/bin" --user-dir t2r_fairseq \
      --task translation -s en -t de --share-all-embeddings "${ARCH[@]}" --encoder-layers 3 --decoder-layers 3 \
      --encoder-embed-dim 128 --decoder-embed-dim 128 --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512 \
      --encoder-attention-heads 4 --decoder-attention-heads 4 --dropout 0.1 \
      --criterion label_smoothed_cross_entropy --label-smoothing 0.1 --optimizer adam --adam-betas "(0.9,0.98)" \
      --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 200 --clip-norm 1.0 --max-tokens 4096 \
      --max-update "$UPDATES" --stop-time-hours "${STOP_HOURS:-0}" --seed "$SEED" --cpu --num-workers 0 \
      --save-dir "$R/mt-$v$SUFFIX_MT" \
      --no-epoch-checkpoints --save-interval 1000 --validate-interval 3 --log-format json --log-interval 50 > "$R/logs/mt_$v$SUFFIX_MT.log" 2>&1
    # --remove-bpe is a no-op on these whitespace tokens; it keeps BLEU on words if the data is BPE'd
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} nice -n 10 "$PY/fairseq-generate" "$D/bin" --user-dir t2r_fairseq \
      --gen-subset valid --path "$R/mt-$v$SUFFIX_MT/checkpoint_last.pt" --beam 4 --max-tokens 8192 --cpu \
      --max-len-a 1.2 --max-len-b 10 --required-batch-size-multiple 1 --distributed-world-size 1 --remove-bpe \
      > "$R/logs/mt_${v}${SUFFIX_MT}_generate.log" 2>&1
    echo "mt_$v$SUFFIX_MT wall_s $(( $(date +%s) - start )) $(grep -o 'BLEU4 = [0-9.]*' "$R/logs/mt_${v}${SUFFIX_MT}_generate.log")" \
      | tee -a "$R/logs/wall.txt"
  done
  exit 0
fi
CORPUS=${CORPUS:-wikitext2}
SUFFIX=$([ "$SEED" = 1 ] || echo "_seed$SEED")
mkdir -p "$R/logs"
case $CORPUS in
  wikitext2)
    D=$R/data
    W=${WIKITEXT:-../shared/data/wikitext-2/valid.txt}
    if [ ! -f "$D/bin/train.bin" ]; then
      mkdir -p "$D"; head -n 3400 "$W" > "$D/train.txt"; tail -n +3401 "$W" > "$D/dev.txt"
    fi ;;
  multi30k)
    D=$R/data-multi30k; SUFFIX=${SUFFIX}_multi30k
    M=${MULTI30K:-../shared/data/multi30k}
    if [ ! -f "$D/bin/train.bin" ]; then mkdir -p "$D"; cp "$M/train.en" "$D/train.txt"; cp "$M/val.en" "$D/dev.txt"; fi ;;
  *) echo "unknown CORPUS $CORPUS (wikitext2, multi30k)" >&2; exit 2 ;;
esac
if [ ! -f "$D/bin/train.bin" ]; then
  nice -n 10 "$PY/fairseq-preprocess" --only-source --trainpref "$D/train.txt" --validpref "$D/dev.txt" \
    --destdir "$D/bin" --thresholdsrc 2 --workers 1
fi
# 4 layers, width 128, FFN 512 (the multi-head baseline has 4 heads); same data order, budget and seed.
COMMON=(--user-dir t2r_fairseq --task masked_lm --criterion masked_lm --tokens-per-sample 128
  --encoder-layers 4 --encoder-embed-dim 128 --encoder-ffn-embed-dim 512 --encoder-attention-heads 4
  --optimizer adam --adam-betas "(0.9,0.98)" --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 50
  --clip-norm 1.0 --batch-size 16 --max-update "$UPDATES" --seed "$SEED" --cpu --num-workers 0
  --validate-interval-updates 50 --no-save --log-format json --log-interval 25)
for v in $VARIANTS; do
  case $v in
    multihead) ARCH=(--arch roberta_small) ;;
    shatter) ARCH=(--arch shatter_roberta_small) ;;
    shatter_softmax) ARCH=(--arch shatter_roberta_small --shatter-score softmax) ;;
    prepare) continue ;;  # data only (e.g. before starting two variants side by side)
    *) echo "unknown variant $v (multihead, shatter, shatter_softmax, prepare)" >&2; exit 2 ;;
  esac
  start=$(date +%s)
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} nice -n 10 "$PY/fairseq-train" "$D/bin" "${COMMON[@]}" "${ARCH[@]}" \
    > "$R/logs/$v$SUFFIX.log" 2>&1
  echo "$v$SUFFIX wall_s $(( $(date +%s) - start ))" | tee -a "$R/logs/wall.txt"
done
