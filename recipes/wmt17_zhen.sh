#!/usr/bin/env bash
# WMT17 ZH-EN (newstest2017): softmax teacher (trained here) -> T2R swap-then-finetune -> sacreBLEU.
#
#   bash recipes/wmt17_zhen.sh [--out DIR] [--stages prep,teacher,finetune,eval] [--force] [--dry-run]
#
# Stages (each skipped when $OUT/.done/<stage> exists; --force redoes the listed stages):
#   prep      data-prep/wmt17_zhen.sh (sentencepiece) and fairseq-preprocess (one dictionary per language)
#   teacher   fairseq publishes no WMT17 ZH-EN transformer, so the teacher is trained here:
#             transformer_vaswani_wmt_en_de_big, decoder input/output embeddings tied (configs/wmt17_zhen_teacher.yaml)
#   finetune  swap to t2r_transformer_vaswani_wmt_en_de_big and finetune (configs/wmt17_zhen_finetune.yaml);
#             interrupted? run it again: fairseq resumes from $OUT/checkpoints/t2r/checkpoint_last.pt
#   eval      fairseq-generate --beam $BEAM --lenpen $LENPEN, sentencepiece removed, sacreBLEU (tok 13a) on
#             the English output against the raw reference (signature printed)
#
# Options: --out DIR (default runs/wmt17_zhen; env WORK), --stages LIST (env STAGES), --force (env FORCE=1),
#          --dry-run (env DRY_RUN=1: print the exact commands, one per line, run nothing), -h/--help.
# Environment (defaults in brackets):
#   TEACHER [train] (no public checkpoint)   TEACHER_CKPT   use this softmax checkpoint instead
#   NUM_GPUS [8]  NUM_NODES [1]  NODE_RANK [0]  MASTER_ADDR [localhost]  MASTER_PORT [29500]
#   LAUNCHER [auto] | spawn | torchrun | srun     CPU [0]  CPU_PROCS [1]  (CPU=1: gloo, for smoke tests)
#   MAX_UPDATE [30000] finetune updates   TEACHER_MAX_UPDATE [300000]   MAX_TOKENS [3584] per GPU
#   UPDATE_FREQ [config x 8 / world size]   FEATURE_SIZE [32]   CROSS_FEATURE_SIZE [128]
#   SPM_VOCAB [32000]  BEAM [5]  LENPEN [1.0]  EVAL_MODELS ["teacher t2r"]
#   EVAL_CHECKPOINT [checkpoint_best.pt]  EVAL_MAX_TOKENS [8000]  PREP_WORKERS [8]
#   PREP_ARGS   extra options for data-prep/wmt17_zhen.sh (see its --help)
#   TRAIN_OVERRIDES / TEACHER_OVERRIDES / FINETUNE_OVERRIDES   extra hydra overrides, e.g. "model.dropout=0.1"
#   T2R_DATA_MIRROR, T2R_DATA_CHECKSUMS   read by data-prep/download.py (local mirror, checksum table)
# Slurm: recipes/slurm/wmt17_zhen.sbatch. Where each default comes from: recipes/configs/wmt17_zhen_*.yaml.
set -euo pipefail
RECIPE=wmt17_zhen DEFAULT_STAGES=prep,teacher,finetune,eval
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
t2r_parse_args "$@"

SRC=zh TGT=en DATA_PREP=wmt17_zhen.sh SEGMENT=spm COMPOUND_SPLIT=0
TEACHER=${TEACHER:-train}
[[ $TEACHER == train ]] || t2r_die "TEACHER=$TEACHER: there is no public WMT17 ZH-EN checkpoint; use TEACHER=train or TEACHER_CKPT=PATH"
TEACHER_CONFIG=wmt17_zhen_teacher FINETUNE_CONFIG=wmt17_zhen_finetune REF_WORLD=8
SPM_VOCAB=${SPM_VOCAB:-32000}
MAX_UPDATE=${MAX_UPDATE:-30000} TEACHER_MAX_UPDATE=${TEACHER_MAX_UPDATE:-300000} MAX_TOKENS=${MAX_TOKENS:-3584}
FEATURE_SIZE=${FEATURE_SIZE:-32} CROSS_FEATURE_SIZE=${CROSS_FEATURE_SIZE:-128}
BEAM=${BEAM:-5} LENPEN=${LENPEN:-1.0}

t2r_mt_main
