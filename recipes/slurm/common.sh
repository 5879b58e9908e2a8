# shellcheck shell=bash
# The body shared by recipes/slurm/*.sbatch (sourced after RECIPE_NAME is set and the cwd is the repository).
#
#  1. prep and teacher download/extract: one process on the first node (no srun), CPU work;
#  2. teacher training (recipes that train one): 'srun' starts one task per GPU on every node and each task runs
#     the recipe's stage; LAUNCHER=srun makes the recipe run plain fairseq-hydra-train with
#     distributed_world_size = nodes x GPUs and distributed_port = MASTER_PORT, the way fairseq's Slurm support
#     expects (fairseq/distributed/utils.py: _infer_slurm_init);
#  3. calibration (tools.convert on the teacher; a no-op with SWAP=plain): one process (one GPU) on the first node;
#  4. the finetune: srun as in 2, starting from the calibrated checkpoint (SWAP=plain: from the teacher);
#  5. evaluation: one process (one GPU) on the first node.
# Env: WORK (default runs/$RECIPE_NAME), MASTER_PORT (default: derived from the job id), DRY_RUN=1, plus every
# variable the recipe documents (TEACHER, MAX_UPDATE, FEATURE_SIZE, ...), which srun passes to its tasks.
NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-2}}
GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-8}}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}   # "a100:8" -> 8
export WORK=${WORK:-runs/$RECIPE_NAME}
export NUM_NODES=$NODES NUM_GPUS=$GPUS_PER_NODE
export MASTER_PORT=${MASTER_PORT:-$(( 10000 + ${SLURM_JOB_ID:-0} % 20000 ))}
RECIPE=(bash "recipes/$RECIPE_NAME.sh" --out "$WORK")
# once: one process on the first node; everywhere: one srun task per GPU on every node.
once() { NUM_GPUS=1 NUM_NODES=1 "${RECIPE[@]}" --stages "$1"; }
everywhere() { srun --nodes "$NODES" --ntasks-per-node "$GPUS_PER_NODE" --kill-on-bad-exit=1 env LAUNCHER=srun "${RECIPE[@]}" --stages "$1"; }
if [[ ${DRY_RUN:-0} == 1 ]]; then
  # Show what each step would run: the srun line, then the recipe's own commands for that stage.
  once() { echo "env NUM_GPUS=1 NUM_NODES=1 ${RECIPE[*]} --stages $1"; NUM_GPUS=1 NUM_NODES=1 DRY_RUN=1 "${RECIPE[@]}" --stages "$1"; }
  everywhere() {
    echo "srun --nodes $NODES --ntasks-per-node $GPUS_PER_NODE --kill-on-bad-exit=1 env LAUNCHER=srun ${RECIPE[*]} --stages $1"
    LAUNCHER=srun SLURM_PROCID=0 SLURM_NTASKS=$(( NODES * GPUS_PER_NODE )) DRY_RUN=1 "${RECIPE[@]}" --stages "$1"
  }
fi
once prep
everywhere teacher
once calibrate
everywhere finetune
once eval
