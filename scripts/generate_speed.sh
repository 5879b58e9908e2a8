#!/usr/bin/env bash
# End-to-end fairseq-generate throughput: a softmax teacher vs its T2R conversion, the T2R on each decode step.
#
#   bash scripts/generate_speed.sh DATA_BIN TEACHER.pt T2R.pt OUT_DIR [fairseq-generate options...]
#
# Runs `fairseq-generate DATA_BIN --batch-size 128 --beam 4 --gen-subset test` (options after OUT_DIR are added, e.g.
# --cpu or --bf16) for the teacher, the T2R eager step and the T2R --decode-step graph / compile_graph
# (--model-overrides), and writes OUT_DIR/generate_speed.md: sentences/s and BLEU from fairseq's own log lines, and
# whether each T2R path's hypotheses equal the eager step's. The models run in turn, REPS rounds [3], so each sees
# the same machine load; sentences/s is the median over the rounds (logs: OUT_DIR/NAME.ROUND.log).
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: bash scripts/generate_speed.sh DATA_BIN TEACHER.pt T2R.pt OUT_DIR [fairseq-generate options...]" >&2; exit 2
fi
data=$1 teacher=$2 t2r=$3 out=$4; shift 4
here=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
PATHS=${DECODE_PATHS:-graph compile_graph} REPS=${REPS:-3}
[[ $REPS =~ ^[1-9][0-9]*$ ]] || { echo "generate_speed: REPS must be a positive integer (got '$REPS')" >&2; exit 2; }
mkdir -p "$out"
gen() {  # name checkpoint [options]
  local name=$1 ckpt=$2; shift 2
  "$PY" -m fairseq_cli.generate "$data" --user-dir "$here/t2r_fairseq" --path "$ckpt" --batch-size 128 --beam 4 \
    --gen-subset test --distributed-world-size 1 --remove-bpe --scoring sacrebleu "$@" > "$out/$name.log" 2>&1 \
    || { echo "generate_speed: $name failed; last lines of $out/$name.log:" >&2; tail -5 "$out/$name.log" >&2; return 1; }
}
row() {  # name -> "| name | sentences/s (median over the rounds) | BLEU |"
  local rate
  rate=$(for log in "$out/$1".*.log; do grep -o '[0-9.]* sentences/s' "$log" | tail -1 | cut -d' ' -f1; done \
         | sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}')
  printf '| %s | %s | %s |' "$1" "$rate" "$(grep -o 'BLEU = [0-9.]*' "$out/$1.1.log" | tail -1 | cut -d' ' -f3)"
}
hyps() { grep '^H-' "$1" | sort -t- -k2,2n; }
for round in $(seq 1 "$REPS"); do
  gen "teacher.$round" "$teacher" "$@"
  gen "t2r_eager.$round" "$t2r" "$@" --model-overrides "{'decode_step': 'eager'}"
  for p in $PATHS; do gen "t2r_$p.$round" "$t2r" "$@" --model-overrides "{'decode_step': '$p'}"; done
done
{
  echo "| model | sentences/s | BLEU | hypotheses equal to t2r_eager |"
  echo "|---|---|---|---|"
  echo "$(row teacher) - |"
  echo "$(row t2r_eager) - |"
  for p in $PATHS; do
    same=$(cmp -s <(hyps "$out/t2r_eager.1.log" | cut -f1,3) <(hyps "$out/t2r_$p.1.log" | cut -f1,3) && echo yes || echo no)
    echo "$(row "t2r_$p") $same |"
  done
  echo
  echo "Command: fairseq-generate $data --batch-size 128 --beam 4 --gen-subset test $* (checkpoints: $teacher, $t2r;"\
       "median of $REPS alternating rounds)"
} > "$out/generate_speed.md"
cat "$out/generate_speed.md"
