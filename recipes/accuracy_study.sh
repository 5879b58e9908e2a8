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
# --rows           comma list of finetune rows (default: all; see ROWS below)
# --tasks          lm,mt (default both)
# Teachers train until dev loss has not improved for $PATIENCE validations ($VALID_EVERY updates apart);
# checkpoint_best.pt is the teacher. Each finetune row runs FT_UPDATES updates (20% of the MT teacher's
# budget by default) and saves a checkpoint every $FT_SAVE_EVERY updates, so one run gives the whole curve.
# Threads: OMP_NUM_THREADS (default 2). Everything lands under --out; finished steps are skipped.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=runs/study M30K="" WT2="" STAGES=data,teacher,finetune,eval,report ROWS_ARG="" TASKS=lm,mt
while [[ $# -gt 0 ]]; do
  case $1 in
    --out) OUT=$2; shift 2;; --multi30k) M30K=$2; shift 2;; --wikitext2) WT2=$2; shift 2;;
    --stages) STAGES=$2; shift 2;; --rows) ROWS_ARG=$2; shift 2;; --tasks) TASKS=$2; shift 2;;
    -h|--help) sed -n '2,17p' "$0"; exit 0;;
    *) echo "accuracy_study: unknown option $1 (see --help)" >&2; exit 2;;
  esac
done
if [[ -x $ROOT/.venv/bin/python ]]; then export PATH=$ROOT/.venv/bin:$PATH; fi
command -v fairseq-train >/dev/null || { echo "accuracy_study: fairseq not found; run 'bash scripts/setup.sh' first" >&2; exit 1; }
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONWARNINGS=ignore
has() { [[ ",$2," == *",$1,"* ]]; }
say() { echo "=== [study $(date +%H:%M:%S)] $*"; }

# ---- fixed setup (see docs/RESULTS.md) -------------------------------------------------------------------
SEED=${SEED:-1} VOCAB=${VOCAB:-6000} VALID_EVERY=${VALID_EVERY:-100} PATIENCE=${PATIENCE:-5}
TEACHER_MAX=${TEACHER_MAX:-4000}
FT_UPDATES=${FT_UPDATES:-400} FT_SAVE_EVERY=${FT_SAVE_EVERY:-50}
COMMON=(--optimizer adam --adam-betas "(0.9,0.98)" --clip-norm 1.0 --max-tokens 4096 --cpu --seed "$SEED"
        --log-format simple --log-interval 25 --num-workers 0 --user-dir "$ROOT/t2r_fairseq" --no-epoch-checkpoints)
LM_ARCH=(--task language_modeling --tokens-per-sample 256 --decoder-layers 4 --decoder-embed-dim 128
         --decoder-ffn-embed-dim 512 --decoder-attention-heads 4 --share-decoder-input-output-embed --dropout 0.2)
MT_ARCH=(--task translation -s en -t de --encoder-layers 3 --decoder-layers 3 --encoder-embed-dim 128
         --decoder-embed-dim 128 --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512 --encoder-attention-heads 4
         --decoder-attention-heads 4 --share-all-embeddings --dropout 0.2
         --criterion label_smoothed_cross_entropy --label-smoothing 0.1)
TEACHER_OPT=(--lr 1.5e-3 --lr-scheduler inverse_sqrt --warmup-updates 300)

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

# ---- teachers ----------------------------------------------------------------------------------------------
if has teacher "$STAGES"; then
  for kind in lm mt; do
    has $kind "$TASKS" || continue
    save=$OUT/checkpoints/teacher.$kind log=$OUT/train/teacher.$kind.log
    if grep -q "done training" "$log" 2>/dev/null; then say "teacher $kind: done"; continue; fi
    mkdir -p "$OUT/train"; arch=transformer_lm; [[ $kind == mt ]] && arch=transformer
    say "teacher $kind -> $log"
    # shellcheck disable=SC2046
    fairseq-train "$OUT/data-bin/$kind" --arch $arch $(arch_args $kind) "${COMMON[@]}" "${TEACHER_OPT[@]}" \
      --max-update "$TEACHER_MAX" --validate-interval-updates "$VALID_EVERY" --save-interval-updates "$VALID_EVERY" \
      --keep-interval-updates 1 --patience "$PATIENCE" --save-dir "$save" > "$log" 2>&1
  done
fi
