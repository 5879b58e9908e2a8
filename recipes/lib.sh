# shellcheck shell=bash
# Shared helpers of the paper recipes (recipes/wikitext103_lm.sh, wmt14_ende.sh, wmt14_enfr.sh, wmt17_zhen.sh).
# Sourced, not run. What it gives every recipe, so that they behave the same way:
#
#   * one work dir ($WORK, --out) holding everything: raw/, data/, data-bin/, teacher/, checkpoints/, logs/, eval/;
#   * stages (--stages prep,teacher,calibrate,finetune,eval); a stage is skipped when its marker
#     $WORK/.done/<stage> exists; --force deletes the marker and that stage's outputs and redoes it;
#   * the swap (SWAP): calibrated (default, the README's recommended recipe: stage calibrate runs
#     t2r_fairseq.tools.convert on the teacher, finetune starts from its checkpoint with the t2r_qk map and
#     --feature-map-lr-scale 8) or plain (the paper's: no calibration, finetune swaps the teacher itself with the
#     tied t2r map and one learning rate);
#   * resumable training: fairseq's own checkpoint_last.pt in the same save dir. An interrupted stage has no
#     marker, so re-running it re-issues the same fairseq-hydra-train command and fairseq continues from
#     checkpoint_last.pt (it only falls back to --finetune-from-model when no checkpoint_last.pt exists);
#   * dry run (--dry-run or DRY_RUN=1): the exact commands, fully expanded, one per line on stdout, and nothing
#     created or run; progress messages always go to stderr;
#   * distributed training through fairseq's own machinery only (see t2r_train): fairseq's spawn on one node,
#     torchrun for several nodes or CPU processes, Slurm srun tasks with --distributed-port.
#
# Environment read here (each recipe documents its own in --help):
#   DRY_RUN=1, FORCE=1, STAGES, WORK          same as --dry-run, --force, --stages, --out
#   NUM_GPUS (8), NUM_NODES (1), NODE_RANK (0), MASTER_ADDR (localhost), MASTER_PORT (29500)
#   LAUNCHER      auto | spawn | torchrun | srun   (auto: srun inside a multi-task Slurm step, torchrun when
#                 NUM_NODES>1, else fairseq's own spawn of NUM_GPUS processes)
#   CPU=1         train/evaluate on CPU (tests, smoke runs); CPU_PROCS=N>1 runs N gloo processes via torchrun
#   UPDATE_FREQ   gradient accumulation; default: the config's value scaled so that world size x update_freq
#                 equals the config's reference (REF_WORLD GPUs), i.e. the same effective batch on any GPU count
#   TRAIN_OVERRIDES, TEACHER_OVERRIDES, FINETUNE_OVERRIDES   extra hydra overrides (space separated)
#   SWAP          calibrated (default) | plain    CALIBRATE_STEPS (300) Adam steps per layer (0: the swap alone)
#   CALIBRATE_ARGS   extra tools.convert options (space separated), e.g. "--calibrate-batches 8 --max-tokens 2048"
#   CALIBRATE_WAIT   seconds a node other than node 0 waits for node 0's calibrated checkpoint (3600)
#   FAIRSEQ_BIN   directory of the fairseq console scripts (default: .venv/bin if present, else PATH)

T2R_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
T2R_CONFIGS=$T2R_ROOT/recipes/configs
T2R_USER_DIR=$T2R_ROOT/t2r_fairseq

t2r_die() { echo "${RECIPE:-recipe}: error: $*" >&2; exit 2; }
t2r_say() { echo "=== [${RECIPE:-recipe}] $(date -u +%T) $*" >&2; }

# Print one command, shell-quoted only where needed, so the line can be pasted into a shell as is.
t2r_quote() {
  local out="" a
  for a in "$@"; do
    if [[ -n $a && $a =~ ^[A-Za-z0-9_./=:,@+%^-]+$ ]]; then out+="$a "
    else out+="'${a//\'/\'\\\'\'}' "; fi
  done
  printf '%s\n' "${out% }"
}

# t2r_run CMD...            run (or, dry run: print) a command
# t2r_run_to FILE CMD...    same, stdout and stderr to FILE (printed as 'CMD > FILE 2>&1')
# t2r_run_tee FILE CMD...   same, output also shown (printed as 'CMD 2>&1 | tee FILE')
t2r_run() {
  if [[ $DRY_RUN == 1 ]]; then t2r_quote "$@"; return 0; fi
  echo "+ $(t2r_quote "$@")" >&2
  "$@"
}
t2r_run_to() {
  local file=$1; shift
  if [[ $DRY_RUN == 1 ]]; then echo "$(t2r_quote "$@") > $(t2r_quote "$file") 2>&1"; return 0; fi
  echo "+ $(t2r_quote "$@") > $file 2>&1" >&2
  mkdir -p "$(dirname "$file")"
  "$@" > "$file" 2>&1 || { local rc=$?; tail -n 30 "$file" >&2; t2r_die "command failed (exit $rc), full log: $file"; }
}
t2r_run_tee() {
  local file=$1; shift
  if [[ $DRY_RUN == 1 ]]; then echo "$(t2r_quote "$@") 2>&1 | tee -a $(t2r_quote "$file")"; return 0; fi
  echo "+ $(t2r_quote "$@") 2>&1 | tee -a $file" >&2
  mkdir -p "$(dirname "$file")"
  "$@" 2>&1 | tee -a "$file" || t2r_die "command failed (exit ${PIPESTATUS[0]}), full log: $file"
}

# ---- options ------------------------------------------------------------------------------------------------

# t2r_parse_args "$@": the options every recipe shares. A recipe sets RECIPE and DEFAULT_STAGES before
# calling it; --help prints the recipe's header comment (its lines 2.. up to the first non-comment line).
t2r_parse_args() {
  WORK=${WORK:-runs/$RECIPE}
  STAGES=${STAGES:-$DEFAULT_STAGES}
  FORCE=${FORCE:-0}
  DRY_RUN=${DRY_RUN:-0}
  while [[ $# -gt 0 ]]; do
    case $1 in
      --out) [[ $# -ge 2 ]] || t2r_die "--out needs a directory"; WORK=$2; shift 2;;
      --stages) [[ $# -ge 2 ]] || t2r_die "--stages needs a list, e.g. --stages ${DEFAULT_STAGES}"; STAGES=$2; shift 2;;
      --force) FORCE=1; shift;;
      --dry-run) DRY_RUN=1; shift;;
      -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0;;
      *) t2r_die "unknown option '$1' (see --help)";;
    esac
  done
  local s
  for s in ${STAGES//,/ }; do
    [[ ",$DEFAULT_STAGES," == *",$s,"* ]] || t2r_die "unknown stage '$s' in --stages; valid: $DEFAULT_STAGES"
  done
  [[ $DRY_RUN == 0 || $DRY_RUN == 1 ]] || t2r_die "DRY_RUN must be 0 or 1 (got '$DRY_RUN')"
  # Absolute work dir: fairseq-hydra-train changes into its run dir, so every path handed to it must be absolute.
  [[ $WORK == /* ]] || WORK=$PWD/$WORK
  WORK=${WORK%/}

  if [[ -z ${FAIRSEQ_BIN:-} ]]; then
    if [[ -x $T2R_ROOT/.venv/bin/fairseq-train ]]; then FAIRSEQ_BIN=$T2R_ROOT/.venv/bin
    elif command -v fairseq-train >/dev/null; then FAIRSEQ_BIN=$(dirname "$(command -v fairseq-train)")
    elif [[ $DRY_RUN == 1 ]]; then FAIRSEQ_BIN=$T2R_ROOT/.venv/bin
    else t2r_die "fairseq not found; run 'bash scripts/setup.sh' (or set FAIRSEQ_BIN to the directory of fairseq-train)"; fi
  fi
  PY=$FAIRSEQ_BIN/python
  [[ -x $PY || $DRY_RUN == 1 ]] || PY=$(command -v python3)

  NUM_GPUS=${NUM_GPUS:-8} NUM_NODES=${NUM_NODES:-1} NODE_RANK=${NODE_RANK:-0}
  MASTER_ADDR=${MASTER_ADDR:-localhost} MASTER_PORT=${MASTER_PORT:-29500}
  LAUNCHER=${LAUNCHER:-auto} CPU=${CPU:-0} CPU_PROCS=${CPU_PROCS:-1}
  local v
  for v in NUM_GPUS NUM_NODES NODE_RANK MASTER_PORT CPU_PROCS; do
    [[ ${!v} =~ ^[0-9]+$ ]] || t2r_die "$v must be a non-negative integer (got '${!v}')"
  done
  case $LAUNCHER in auto|spawn|torchrun|srun) ;; *) t2r_die "LAUNCHER must be auto, spawn, torchrun or srun (got '$LAUNCHER')";; esac
  [[ $CPU == 0 || $CPU == 1 ]] || t2r_die "CPU must be 0 or 1 (got '$CPU')"
  if [[ $CPU == 1 ]]; then WORLD=$CPU_PROCS; else WORLD=$(( NUM_GPUS * NUM_NODES )); fi
  (( WORLD >= 1 )) || t2r_die "world size is 0: set NUM_GPUS>=1 (or CPU=1 CPU_PROCS>=1)"
  SWAP=${SWAP:-calibrated} CALIBRATE_STEPS=${CALIBRATE_STEPS:-300} CALIBRATE_WAIT=${CALIBRATE_WAIT:-3600}
  case $SWAP in calibrated|plain) ;; *) t2r_die "SWAP must be 'calibrated' (the default) or 'plain' (the paper's swap) (got '$SWAP')";; esac
  for v in CALIBRATE_STEPS CALIBRATE_WAIT; do
    [[ ${!v} =~ ^[0-9]+$ ]] || t2r_die "$v must be a non-negative integer (got '${!v}')"
  done
  CALIBRATED=$WORK/checkpoints/calibrated.pt
  export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
}

t2r_has_stage() { [[ ",$STAGES," == *",$1,"* ]]; }

# Rank 0 of a multi-task Slurm step and node 0 of a multi-node torchrun (or a plain single-node run): the
# process that writes markers and runs the single-process stages (prep, calibrate, eval).
t2r_is_rank0() { [[ ${SLURM_PROCID:-0} == 0 && ${NODE_RANK:-0} == 0 ]]; }

# t2r_stage NAME OUTPUT...: should stage NAME run? Skips (returns 1) when its marker exists, unless --force,
# which first deletes the marker and the listed outputs.
t2r_stage() {
  local name=$1; shift
  t2r_has_stage "$name" || return 1
  local marker=$WORK/.done/$name
  if [[ $FORCE == 1 ]]; then
    if [[ $# -gt 0 ]]; then t2r_run rm -rf "$@"; fi
    t2r_run rm -f "$marker"
  elif [[ -e $marker ]]; then
    t2r_say "$name: done (marker $marker exists; --force redoes it)"
    return 1
  fi
  t2r_say "$name"
  return 0
}

# t2r_mark NAME: record that stage NAME finished (only rank 0 writes; nothing in a dry run).
t2r_mark() {
  [[ $DRY_RUN == 1 ]] && return 0
  t2r_is_rank0 || return 0
  mkdir -p "$WORK/.done"
  date -u +%FT%TZ > "$WORK/.done/$1"
}

# t2r_need FILE [HINT]: fail with one clear message when an input of a stage is missing (not in a dry run).
t2r_need() {
  [[ $DRY_RUN == 1 || -e $1 ]] && return 0
  t2r_die "missing $1${2:+ ($2)}"
}

# ---- downloads ----------------------------------------------------------------------------------------------

# t2r_fetch_archive URL DEST_DIR [SHA256]: download (resumable, via data-prep/download.py, which honours
# T2R_DATA_MIRROR and T2R_DATA_CHECKSUMS) and extract into DEST_DIR; a marker makes it a no-op next time.
t2r_fetch_archive() {
  local url=$1 dest=$2 sum=${3:-}
  local name=${url##*/}
  local archive=$WORK/downloads/$name
  if [[ $DRY_RUN == 0 && -e $dest/.extracted ]]; then return 0; fi
  if [[ " ${T2R_FETCHED:-} " == *" $dest "* ]]; then return 0; fi   # already fetched by an earlier stage of this run
  T2R_FETCHED="${T2R_FETCHED:-} $dest"
  local args=(--url "$url" --dest "$WORK/downloads")
  [[ -n $sum ]] && args+=(--sha256 "$sum")
  local dl=("$PY" "$T2R_ROOT/data-prep/download.py" "${args[@]}")
  if [[ $DRY_RUN == 1 ]]; then t2r_quote "${dl[@]}"
  else
    echo "+ $(t2r_quote "${dl[@]}")" >&2
    archive=$("${dl[@]}") || t2r_die "download of $url failed (see the message above; T2R_DATA_MIRROR serves a local copy)"
  fi
  t2r_run mkdir -p "$dest"
  case $name in
    *.tar.bz2|*.tbz2) t2r_run tar -xjf "$archive" -C "$dest";;
    *.tar.gz|*.tgz) t2r_run tar -xzf "$archive" -C "$dest";;
    *.tar) t2r_run tar -xf "$archive" -C "$dest";;
    *) t2r_die "don't know how to extract $name (expected .tar.bz2, .tar.gz or .tar)";;
  esac
  [[ $DRY_RUN == 1 ]] || touch "$dest/.extracted"
}

# t2r_find_in DIR NAME: the single file NAME somewhere under DIR (archives differ in their top-level folder).
# In a dry run, where nothing was extracted, it prints the path the archive is expected to produce.
t2r_find_in() {
  local dir=$1 name=$2 expect=${3:-}
  if [[ $DRY_RUN == 1 && ! -d $dir ]]; then echo "$dir/${expect:+$expect/}$name"; return 0; fi
  local hits
  hits=$(find "$dir" -name "$name" -type f | sort)
  [[ -n $hits ]] || t2r_die "no $name under $dir: the archive does not have the expected layout"
  [[ $(wc -l <<< "$hits") == 1 ]] || t2r_die "several files named $name under $dir: $(tr '\n' ' ' <<< "$hits")"
  echo "$hits"
}

# ---- training -----------------------------------------------------------------------------------------------

# t2r_config_update_freq CONFIG: the update_freq written in recipes/configs/CONFIG.yaml.
t2r_config_update_freq() {
  local v
  v=$(sed -n 's/^ *update_freq: *\[ *\([0-9]*\) *\].*/\1/p' "$T2R_CONFIGS/$1.yaml" | head -n 1)
  echo "${v:-1}"
}

# t2r_update_freq CONFIG REF_WORLD: UPDATE_FREQ if set, else the config's update_freq scaled from its
# reference world size to ours (at least 1), which keeps the effective batch of the paper setting.
t2r_update_freq() {
  if [[ -n ${UPDATE_FREQ:-} ]]; then echo "$UPDATE_FREQ"; return; fi
  local uf ref=$2
  uf=$(t2r_config_update_freq "$1")
  local scaled=$(( (uf * ref + WORLD - 1) / WORLD ))
  (( scaled >= 1 )) || scaled=1
  echo "$scaled"
}

# t2r_launch_mode: which of fairseq's distributed entry paths this run takes.
t2r_launch_mode() {
  if [[ $CPU == 1 ]]; then
    if (( WORLD > 1 )); then echo cpu-torchrun; else echo single; fi
    return
  fi
  local mode=$LAUNCHER
  if [[ $mode == auto ]]; then
    if [[ -n ${SLURM_PROCID:-} && ${SLURM_NTASKS:-1} -gt 1 ]]; then mode=srun
    elif (( NUM_NODES > 1 )); then mode=torchrun
    else mode=spawn; fi
  fi
  if [[ $mode == spawn && $WORLD == 1 ]]; then mode=single; fi
  echo "$mode"
}

# t2r_train NAME CONFIG SAVE_DIR LOG [hydra overrides...]
# fairseq-hydra-train --config-dir recipes/configs --config-name CONFIG with the paths, the distributed
# settings and the overrides on the command line (later overrides win, so env-derived ones come last).
#   single        one process
#   spawn         one node, NUM_GPUS GPUs: fairseq spawns the workers itself (distributed_world_size)
#   torchrun      torchrun --nnodes NUM_NODES --nproc_per_node NUM_GPUS on every node (NODE_RANK, MASTER_ADDR);
#                 fairseq reads RANK/WORLD_SIZE from the environment (env:// init)
#   srun          inside 'srun --ntasks-per-node=NUM_GPUS': one task per GPU, fairseq reads SLURM_PROCID etc.
#                 and rendezvous on MASTER_PORT of the first node (distributed_port)
#   cpu-torchrun  CPU_PROCS gloo processes via torchrun. fairseq 0.12's spawn path starts
#                 min(cuda devices, world) = 0 workers without a GPU, and its torchrun detection divides by
#                 the GPU count, so the init method, rank (-1: taken from torchrun's RANK) and no-spawn are
#                 given explicitly; legacy_ddp because torch's DDP wrapper is built with CUDA device ids.
t2r_train() {
  local name=$1 config=$2 save=$3 log=$4; shift 4
  t2r_need "$T2R_CONFIGS/$config.yaml"
  local mode cmd=()
  mode=$(t2r_launch_mode)
  local dist=(distributed_training.distributed_world_size="$WORLD")
  case $mode in
    single) cmd=("$FAIRSEQ_BIN/fairseq-hydra-train");;
    spawn) cmd=("$FAIRSEQ_BIN/fairseq-hydra-train");;
    torchrun)
      cmd=("$FAIRSEQ_BIN/torchrun" --nnodes "$NUM_NODES" --nproc_per_node "$NUM_GPUS" --node_rank "$NODE_RANK"
           --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$FAIRSEQ_BIN/fairseq-hydra-train");;
    srun)
      cmd=("$FAIRSEQ_BIN/fairseq-hydra-train")
      dist+=(distributed_training.distributed_port="$MASTER_PORT");;
    cpu-torchrun)
      cmd=("$FAIRSEQ_BIN/torchrun" --nnodes 1 --nproc_per_node "$WORLD" --master_addr "$MASTER_ADDR"
           --master_port "$MASTER_PORT" "$FAIRSEQ_BIN/fairseq-hydra-train")
      dist+=(distributed_training.distributed_backend=gloo distributed_training.distributed_init_method=env://
             distributed_training.distributed_no_spawn=true distributed_training.distributed_rank=-1
             distributed_training.ddp_backend=legacy_ddp);;
  esac
  local cpu=()
  [[ $CPU == 1 ]] && cpu=(common.cpu=true common.fp16=false)
  cmd+=(--config-dir "$T2R_CONFIGS" --config-name "$config"
        hydra.run.dir="$WORK/logs/hydra/$name"
        common.user_dir="$T2R_USER_DIR" checkpoint.save_dir="$save"
        "${dist[@]}" "${cpu[@]}" "$@")
  # When a Slurm step runs this on every task, each task launches its own worker; only rank 0 tees the log.
  if [[ $mode == srun ]] && ! t2r_is_rank0; then t2r_run "${cmd[@]}" > /dev/null; return; fi
  t2r_run_tee "$log" "${cmd[@]}"
  if [[ $DRY_RUN == 0 ]] && t2r_is_rank0; then
    grep -q "done training" "$log" || t2r_die "training '$name' did not finish, see $log (re-run the stage to resume from $save/checkpoint_last.pt)"
  fi
}

# Space-separated extra overrides from an env var, as an array (word splitting is the documented format).
t2r_split() { local -n _out=$1; read -r -a _out <<< "${2:-}"; }

# ---- the swap: calibrated (default) or plain -----------------------------------------------------------------
# SWAP=calibrated, the README's recommended recipe: stage calibrate (one process, rank 0) runs tools.convert on the
#   teacher -- the swap, then each new feature map fitted to the teacher's softmax attention on a few training
#   batches -- and writes $CALIBRATED; finetune starts from that checkpoint with the t2r_qk map and the maps'
#   8x learning rate (ahead of the paper's recipe at the same finetuning budget: docs/PAPER.md, docs/RESULTS.md).
# SWAP=plain, the paper's recipe: no calibration; finetune loads the teacher itself (the swap happens when
#   fairseq-hydra-train loads it) with the paper's tied t2r map and one learning rate for all parameters.

# t2r_calibrate_plain: true when SWAP=plain, after saying so if the calibrate stage was asked for.
t2r_calibrate_plain() {
  [[ $SWAP == plain ]] || return 1
  if t2r_has_stage calibrate; then
    t2r_say "calibrate: nothing to do with SWAP=plain (the finetune stage swaps the teacher itself, the paper's recipe)"
  fi
  return 0
}

# t2r_calibrate_elsewhere: true (after a message) on every process but rank 0, which alone runs the stage; the
# others wait for its checkpoint in their finetune stage (t2r_finetune_start).
t2r_calibrate_elsewhere() {
  t2r_is_rank0 && return 1
  if t2r_has_stage calibrate && [[ $SWAP != plain ]]; then
    t2r_say "calibrate: runs on node 0 only (NODE_RANK=$NODE_RANK${SLURM_PROCID:+ SLURM_PROCID=$SLURM_PROCID}); this node's finetune waits for $CALIBRATED"
  fi
  return 0
}

# t2r_calibrate TEACHER [tools.convert options...]: the calibrate stage's command, once t2r_stage said it runs.
# On the GPU unless CPU=1 (as the training stages), with the finetune stage's map and feature size.
t2r_calibrate() {
  local teacher=$1; shift
  t2r_need "$teacher" "run the teacher stage first"
  t2r_need "$BIN" "run the prep stage first"
  local device=cuda more=()
  [[ $CPU == 1 ]] && device=cpu
  t2r_split more "${CALIBRATE_ARGS:-}"
  t2r_run_tee "$WORK/logs/calibrate.log" "$PY" -m t2r_fairseq.tools.convert "$teacher" "$CALIBRATED" --data "$BIN" \
    --feature-map t2r_qk --feature-size "$FEATURE_SIZE" "$@" --calibrate-steps "$CALIBRATE_STEPS" --seed 1 \
    --device "$device" "${more[@]}"
  t2r_need "$CALIBRATED" "tools.convert wrote no checkpoint, see $WORK/logs/calibrate.log"
  t2r_mark calibrate
}

# t2r_finetune_start TEACHER_CKPT: sets START (the checkpoint the finetune stage loads) and SWAP_OVERRIDES (its
# feature map and the maps' learning-rate scale). SWAP=calibrated: the calibrated checkpoint, which a process
# other than rank 0 waits for (up to CALIBRATE_WAIT seconds; tools.convert writes it to a temporary file and
# renames it, so once it exists it is complete); SWAP=plain: the teacher itself.
t2r_finetune_start() {
  if [[ $SWAP == plain ]]; then
    START=$1 SWAP_OVERRIDES=(model.feature_map=t2r model.feature_map_lr_scale=1.0)
    t2r_need "$START" "run the teacher stage first"
    return 0
  fi
  START=$CALIBRATED SWAP_OVERRIDES=(model.feature_map=t2r_qk model.feature_map_lr_scale=8.0)
  if [[ $DRY_RUN == 0 && ! -e $START ]] && ! t2r_is_rank0; then
    t2r_say "finetune: waiting up to ${CALIBRATE_WAIT}s (CALIBRATE_WAIT) for node 0's calibrate stage to write $START"
    local waited=0 step
    while [[ ! -e $START ]] && (( waited < CALIBRATE_WAIT )); do
      step=$(( CALIBRATE_WAIT - waited < 5 ? CALIBRATE_WAIT - waited : 5 ))
      sleep "$step"; waited=$(( waited + step ))
    done
    t2r_need "$START" "node 0's calibrate stage did not write it within CALIBRATE_WAIT=${CALIBRATE_WAIT}s; run --stages calibrate on node 0, or SWAP=plain"
  fi
  t2r_need "$START" "run the calibrate stage first, or SWAP=plain to finetune from the teacher itself"
}

# ---- translation pipeline (shared by wmt14_ende.sh, wmt14_enfr.sh, wmt17_zhen.sh) ---------------------------
# The recipe sets: SRC TGT DATA_PREP (data-prep script) SEGMENT (bpe|spm) TEACHER (download|train)
# TEACHER_URL TEACHER_SHA256 TEACHER_CONFIG FINETUNE_CONFIG REF_WORLD BEAM LENPEN COMPOUND_SPLIT (0|1)
# TOKENISED_BLEU (0|1) BPE_TOKENS / SPM_VOCAB, FEATURE_SIZE, MAX_TOKENS, TEACHER_MAX_UPDATE, MAX_UPDATE, LR; the user
# may set CROSS_ATTENTION and CROSS_FEATURE_SIZE (t2r_mt_cross).

# The encoder-decoder attention. CROSS_ATTENTION=softmax (the default with SWAP=calibrated): fairseq's own
# cross-attention over the cached source is kept and only the decoder self-attention is swapped -- within 0.3 BLEU
# of the teacher finetuned the same way, where the all-linear model was 0.6-1.25 behind, and as fast at sentence level
# (docs/RESULTS.md); its state grows with the source, not the target. CROSS_ATTENTION=linear (the default with
# SWAP=plain, the paper's model): kernelised with CROSS_FEATURE_SIZE [128] features, a state constant in the source
# length too (long sources: docs/BENCHMARKS.md). Sets CROSS_CONVERT_ARGS (tools.convert) and CROSS_OVERRIDES (hydra).
t2r_mt_cross() {
  local default=softmax
  [[ $SWAP == plain ]] && default=linear
  CROSS_ATTENTION=${CROSS_ATTENTION:-$default}
  case $CROSS_ATTENTION in
    softmax)
      [[ -z ${CROSS_FEATURE_SIZE:-} ]] || t2r_die "CROSS_FEATURE_SIZE sizes the linear cross-attention, but CROSS_ATTENTION is softmax: unset CROSS_FEATURE_SIZE, or set CROSS_ATTENTION=linear"
      CROSS_CONVERT_ARGS=(--softmax-cross-attention) CROSS_OVERRIDES=(model.softmax_cross_attention=true);;
    linear)
      CROSS_FEATURE_SIZE=${CROSS_FEATURE_SIZE:-128}
      [[ $CROSS_FEATURE_SIZE =~ ^[1-9][0-9]*$ ]] || t2r_die "CROSS_FEATURE_SIZE must be a positive integer (got '$CROSS_FEATURE_SIZE')"
      CROSS_CONVERT_ARGS=(--cross-feature-size "$CROSS_FEATURE_SIZE")
      CROSS_OVERRIDES=(model.softmax_cross_attention=false model.cross_feature_size="$CROSS_FEATURE_SIZE");;
    *) t2r_die "CROSS_ATTENTION must be 'softmax' (the default) or 'linear' (the paper's; default with SWAP=plain) (got '$CROSS_ATTENTION')";;
  esac
}

t2r_mt_paths() {
  DATA=$WORK/data BIN=$WORK/data-bin PUBLIC=$WORK/teacher/public
  TEACHER_DIR=$WORK/checkpoints/teacher T2R_DIR=$WORK/checkpoints/t2r
  case $TEACHER in download|train) ;; *) t2r_die "TEACHER must be 'download' or 'train' (got '$TEACHER')";; esac
  [[ $TEACHER == train ]] && TEACHER_CKPT=${TEACHER_CKPT:-$TEACHER_DIR/checkpoint_best.pt}
  return 0
}

# The teacher checkpoint: TEACHER_CKPT if set, the trained one, or model.pt of the extracted public archive.
t2r_mt_teacher_ckpt() {
  [[ -n ${TEACHER_CKPT:-} ]] && return 0
  TEACHER_CKPT=$(t2r_find_in "$PUBLIC" model.pt "$TEACHER_ARCHIVE_DIR") || exit 2
}

t2r_mt_prep() {
  t2r_stage prep "$DATA" "$BIN" || return 0
  local prep=(bash "$T2R_ROOT/data-prep/$DATA_PREP" --out "$DATA" --raw "$WORK/raw")
  local dicts=(--joined-dictionary)
  if [[ $TEACHER == download ]]; then
    # A public checkpoint fixes the subword vocabulary: its BPE codes segment the data and its dictionaries
    # binarise it, so every token id means what the checkpoint's embeddings were trained on.
    t2r_fetch_archive "$TEACHER_URL" "$PUBLIC" "${TEACHER_SHA256:-}"
    prep+=(--bpe-codes "$(t2r_find_in "$PUBLIC" bpecodes "$TEACHER_ARCHIVE_DIR")")
    dicts=(--srcdict "$(t2r_find_in "$PUBLIC" "dict.$SRC.txt" "$TEACHER_ARCHIVE_DIR")"
           --tgtdict "$(t2r_find_in "$PUBLIC" "dict.$TGT.txt" "$TEACHER_ARCHIVE_DIR")")
  elif [[ $SEGMENT == bpe ]]; then
    prep+=(--bpe-tokens "$BPE_TOKENS")
  else
    prep+=(--spm-vocab "$SPM_VOCAB")
    dicts=()   # Chinese and English keep separate vocabularies (only decoder in/out embeddings are tied)
  fi
  local more=()
  t2r_split more "${PREP_ARGS:-}"
  t2r_run "${prep[@]}" "${more[@]}"
  t2r_need "$DATA/DONE" "data-prep/$DATA_PREP did not finish"
  t2r_run_to "$WORK/logs/preprocess.log" "$FAIRSEQ_BIN/fairseq-preprocess" --source-lang "$SRC" --target-lang "$TGT" \
    --trainpref "$DATA/train" --validpref "$DATA/valid" --testpref "$DATA/test" \
    --destdir "$BIN" "${dicts[@]}" --workers "${PREP_WORKERS:-8}"
  # With a public teacher's dictionary, words it does not know become <unk>: show how many (a high rate means
  # the segmentation differs from the one the checkpoint was trained on).
  [[ $DRY_RUN == 1 ]] || grep -h "replaced by <unk>" "$WORK/logs/preprocess.log" | sed "s/^/[$RECIPE] /" >&2 || true
  t2r_mark prep
}

t2r_mt_teacher() {
  t2r_stage teacher "$TEACHER_DIR" "$WORK/logs/teacher.log" || return 0
  if [[ $TEACHER == download ]]; then
    t2r_fetch_archive "$TEACHER_URL" "$PUBLIC" "${TEACHER_SHA256:-}"
    t2r_mt_teacher_ckpt
  else
    local extra=() more=()
    t2r_split extra "${TRAIN_OVERRIDES:-}"; t2r_split more "${TEACHER_OVERRIDES:-}"
    t2r_train teacher "$TEACHER_CONFIG" "$TEACHER_DIR" "$WORK/logs/teacher.log" \
      task.data="$BIN" optimization.max_update="$TEACHER_MAX_UPDATE" dataset.max_tokens="$MAX_TOKENS" \
      "optimization.update_freq=[$(t2r_update_freq "$TEACHER_CONFIG" "$REF_WORLD")]" "${extra[@]}" "${more[@]}"
  fi
  t2r_mark teacher
}

# The teacher a stage reads: fails clearly when a public teacher has not been fetched yet.
t2r_mt_need_teacher() {
  [[ $TEACHER == download && -z ${TEACHER_CKPT:-} && ! -d $PUBLIC && $DRY_RUN == 0 ]] && t2r_die "no teacher yet: run the teacher stage first"
  t2r_mt_teacher_ckpt
}

t2r_mt_calibrate() {
  t2r_calibrate_plain && return 0
  t2r_calibrate_elsewhere && return 0
  t2r_stage calibrate "$CALIBRATED" "$WORK/logs/calibrate.log" || return 0
  t2r_mt_need_teacher
  t2r_calibrate "$TEACHER_CKPT" "${CROSS_CONVERT_ARGS[@]}"
}

t2r_mt_finetune() {
  t2r_stage finetune "$T2R_DIR" "$WORK/logs/finetune.log" || return 0
  if [[ $SWAP == plain ]]; then t2r_mt_need_teacher; fi
  t2r_finetune_start "${TEACHER_CKPT:-}"
  local extra=() more=()
  t2r_split extra "${TRAIN_OVERRIDES:-}"; t2r_split more "${FINETUNE_OVERRIDES:-}"
  t2r_train finetune "$FINETUNE_CONFIG" "$T2R_DIR" "$WORK/logs/finetune.log" \
    task.data="$BIN" checkpoint.finetune_from_model="$START" "${SWAP_OVERRIDES[@]}" \
    model.feature_size="$FEATURE_SIZE" "${CROSS_OVERRIDES[@]}" \
    optimization.max_update="$MAX_UPDATE" lr_scheduler.total_num_update="$MAX_UPDATE" dataset.max_tokens="$MAX_TOKENS" \
    "optimization.update_freq=[$(t2r_update_freq "$FINETUNE_CONFIG" "$REF_WORLD")]" "${extra[@]}" "${more[@]}"
  t2r_mark finetune
}

# Generate with beam search and length penalty, then score: detokenised sacreBLEU against the raw
# reference (signature printed) and, with COMPOUND_SPLIT=1, the tokenised compound-split BLEU.
# --required-batch-size-multiple 1: fairseq 0.12's batch_by_size drops a last batch whose size is not a
# multiple of it (default 8), silently leaving up to 7 test sentences untranslated (fairseq issue #5036);
# --distributed-world-size 1: its default is the number of visible GPUs, and fairseq-generate then translates
# only shard 0 of the test set (1/8 on an 8-GPU node). The scorer refuses output that does not cover every
# reference line, which catches both.
t2r_mt_eval() {
  t2r_stage eval "$WORK/eval" || return 0
  local name ckpt cpu=() post
  [[ $CPU == 1 ]] && cpu=(--cpu)
  if [[ $SEGMENT == bpe ]]; then post=(--remove-bpe); else post=(--post-process sentencepiece); fi
  for name in ${EVAL_MODELS:-teacher t2r}; do
    case $name in
      teacher) t2r_mt_teacher_ckpt; ckpt=$TEACHER_CKPT;;
      t2r) ckpt=$T2R_DIR/${EVAL_CHECKPOINT:-checkpoint_best.pt};;
      *) t2r_die "EVAL_MODELS: unknown model '$name' (valid: teacher t2r)";;
    esac
    t2r_need "$ckpt" "train it first (stages teacher/finetune)"
    local gen=$WORK/eval/$name.generate.txt
    t2r_run_to "$gen" "$FAIRSEQ_BIN/fairseq-generate" "$BIN" --user-dir "$T2R_USER_DIR" --path "$ckpt" \
      --source-lang "$SRC" --target-lang "$TGT" --gen-subset test --beam "$BEAM" --lenpen "$LENPEN" \
      --max-tokens "${EVAL_MAX_TOKENS:-8000}" --required-batch-size-multiple 1 --distributed-world-size 1 \
      "${post[@]}" "${cpu[@]}"
    local score=(-m t2r_fairseq.tools.sacrebleu_from_generate "$gen" --ref "$DATA/ref/test.$TGT"
                 --tokenize "${SACREBLEU_TOKENIZE:-13a}" --label "$RECIPE $name")
    [[ $SEGMENT == bpe ]] && score+=(--detok-lang "$TGT")
    t2r_run_tee "$WORK/eval/$name.bleu.txt" "$PY" "${score[@]}"
    if [[ $COMPOUND_SPLIT == 1 ]]; then
      t2r_run_tee "$WORK/eval/$name.bleu.txt" "$PY" -m t2r_fairseq.tools.sacrebleu_from_generate "$gen" \
        --compound-split --label "$RECIPE $name"
    elif [[ ${TOKENISED_BLEU:-0} == 1 ]]; then
      t2r_run_tee "$WORK/eval/$name.bleu.txt" "$PY" -m t2r_fairseq.tools.sacrebleu_from_generate "$gen" \
        --tokenised --label "$RECIPE $name"
    fi
  done
  t2r_mark eval
}

t2r_mt_main() {
  t2r_mt_cross
  t2r_mt_paths
  if t2r_is_rank0; then t2r_mt_prep; fi
  t2r_mt_teacher
  t2r_mt_calibrate
  t2r_mt_finetune
  if t2r_is_rank0; then t2r_mt_eval; fi
}
