#!/usr/bin/env bash
# Translation speed, end to end, T2R against its softmax teacher: the rows of docs/BENCHMARKS.md "Whole generation".
#
#   bash scripts/mt_speed.sh DATA_BIN OUT_DIR teacher=TEACHER.pt t2r=T2R.pt [NAME=CKPT ...]
#
# Runs python -m t2r_fairseq.tools.generate_speed (fairseq's SequenceGenerator over the whole split, the models in
# alternating rounds, medians, ratios against the first model; the attention-free bound where lengths are forced) for
#   sentences  the test split as it is, --batch-size 128, beam 4 and beam 1, lengths as the models choose them;
#   long_out   the same sources, every hypothesis forced to LONG (200) tokens (--min-len), beam 4;
#   long_src   sources of JOIN (16) consecutive test sentences joined by tools.concat_sources (Multi30k: ~250
#              tokens), outputs up to 1.2 x source + 10, beam 4;
# and writes OUT_DIR/mt_speed.md (each table with its command). Environment: SRC, TGT (en, de), SUBSET (test),
# REPS (3), THREADS (0: torch's default), JOIN (16), LONG (200), BATCH (128 sentences per batch), BATCHES (0: all;
# N limits each row to its first N batches).
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: bash scripts/mt_speed.sh DATA_BIN OUT_DIR teacher=TEACHER.pt t2r=T2R.pt [NAME=CKPT ...]" >&2; exit 2
fi
data=$1 out=$2; shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$([[ -x $here/.venv/bin/python ]] && echo "$here/.venv/bin/python" || echo python3)}
SRC=${SRC:-en} TGT=${TGT:-de} SUBSET=${SUBSET:-test} REPS=${REPS:-3} THREADS=${THREADS:-0} JOIN=${JOIN:-16}
BATCHES=${BATCHES:-0} LONG=${LONG:-200} BATCH=${BATCH:-128}
mkdir -p "$out"
report=$out/mt_speed.md
: > "$report"
row() {  # title data [generate_speed options...]
  local title=$1 bin=$2; shift 2
  local cmd=("$PY" -m t2r_fairseq.tools.generate_speed "$bin" "$@" --subset "$SUBSET" --reps "$REPS"
             --threads "$THREADS" --batch-size "$BATCH" --max-batches "$BATCHES")
  echo "== $title" >&2
  { echo "### $title"; echo; "${cmd[@]}" 2> "$out/${title// /_}.log"; echo; echo "Command: python ${cmd[*]:1}"; echo; } >> "$report"
}
models=("$@")
row "sentences, beam 4" "$data" "${models[@]}" --beam 4
row "sentences, beam 1" "$data" "${models[@]}" --beam 1
row "long outputs ($LONG tokens), beam 4" "$data" "${models[@]}" --beam 4 --min-len "$LONG" --max-len-b "$LONG" --bound
"$PY" -m t2r_fairseq.tools.concat_sources "$data" "$out/long-src-bin" --src "$SRC" --tgt "$TGT" --subset "$SUBSET" \
  --join "$JOIN" > "$out/concat_sources.log" 2>&1
row "long sources ($JOIN sentences joined), beam 4" "$out/long-src-bin" "${models[@]}" --beam 4 --max-len-a 1.2 --max-len-b 10
cat "$report"
