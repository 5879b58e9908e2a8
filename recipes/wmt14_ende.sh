#!/usr/bin/env bash
# WMT14 EN-DE (newstest2014): softmax teacher -> T2R swap-then-finetune -> BLEU (Kasai et al. 2021, Table 2).
#
#   bash recipes/wmt14_ende.sh [--out DIR] [--stages prep,teacher,finetune,eval] [--force] [--dry-run]
#
# Stages (each skipped when $OUT/.done/<stage> exists; --force redoes the listed stages):
#   prep      data-prep/wmt14_ende.sh (Moses + BPE; with the public teacher: its BPE codes) and
#             fairseq-preprocess (with the public teacher: its dictionaries) -> $OUT/data-bin
#   teacher   TEACHER=download (default): fairseq's public transformer.wmt16.en-de (Ott et al. 2018: big
#             transformer trained on the WMT'16 EN-DE release prepared by Google, which is the WMT14 training
#             data with News Commentary v11, newstest2013 dev, newstest2014 test, joint 32k BPE);
#             TEACHER=train: train transformer_vaswani_wmt_en_de_big on our own data (configs/wmt14_ende_teacher.yaml)
#   finetune  swap to t2r_transformer_vaswani_wmt_en_de_big and finetune (configs/wmt14_ende_finetune.yaml);
#             interrupted? run it again: fairseq resumes from $OUT/checkpoints/t2r/checkpoint_last.pt
#   eval      fairseq-generate --beam $BEAM --lenpen $LENPEN on newstest2014, detokenised sacreBLEU against
#             the raw reference (signature printed) and the tokenised compound-split BLEU the paper reports
#
# Options: --out DIR (default runs/wmt14_ende; env WORK), --stages LIST (env STAGES), --force (env FORCE=1),
#          --dry-run (env DRY_RUN=1: print the exact commands, one per line, run nothing), -h/--help.
# Environment (defaults in brackets):
#   TEACHER [download] | train        TEACHER_CKPT   use this softmax checkpoint instead
#   TEACHER_URL [fairseq's archive]  TEACHER_SHA256  verify the archive (we know of no published checksum)
#   NUM_GPUS [8]  NUM_NODES [1]  NODE_RANK [0]  MASTER_ADDR [localhost]  MASTER_PORT [29500]
#   LAUNCHER [auto] | spawn | torchrun | srun     CPU [0]  CPU_PROCS [1]  (CPU=1: gloo, for smoke tests)
#   MAX_UPDATE [30000] finetune updates   TEACHER_MAX_UPDATE [300000]   MAX_TOKENS [3584] per GPU
#   UPDATE_FREQ [config x 8 / world size]   FEATURE_SIZE [32]   CROSS_FEATURE_SIZE [128]
#   BPE_TOKENS [32000] (TEACHER=train)  BEAM [4]  LENPEN [0.6]  EVAL_MODELS ["teacher t2r"]
#   EVAL_CHECKPOINT [checkpoint_best.pt]  EVAL_MAX_TOKENS [8000]  PREP_WORKERS [8]
#   PREP_ARGS   extra data-prep options, e.g. "--icml17" (EN-DE: News Commentary v9, i.e. the WMT14 release)
#   TRAIN_OVERRIDES / TEACHER_OVERRIDES / FINETUNE_OVERRIDES   extra hydra overrides, e.g. "model.dropout=0.1"
#   T2R_DATA_MIRROR, T2R_DATA_CHECKSUMS   read by data-prep/download.py (local mirror, checksum table)
# Slurm: recipes/slurm/wmt14_ende.sbatch. Where each default comes from: recipes/configs/wmt14_ende_*.yaml.
set -euo pipefail
RECIPE=wmt14_ende DEFAULT_STAGES=prep,teacher,finetune,eval
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
t2r_parse_args "$@"

SRC=en TGT=de DATA_PREP=wmt14_ende.sh SEGMENT=bpe COMPOUND_SPLIT=1
TEACHER=${TEACHER:-download}
TEACHER_URL=${TEACHER_URL:-https://dl.fbaipublicfiles.com/fairseq/models/wmt16.en-de.joined-dict.transformer.tar.bz2}
TEACHER_ARCHIVE_DIR=wmt16.en-de.joined-dict.transformer
TEACHER_CONFIG=wmt14_ende_teacher FINETUNE_CONFIG=wmt14_ende_finetune REF_WORLD=8
BPE_TOKENS=${BPE_TOKENS:-32000}
MAX_UPDATE=${MAX_UPDATE:-30000} TEACHER_MAX_UPDATE=${TEACHER_MAX_UPDATE:-300000} MAX_TOKENS=${MAX_TOKENS:-3584}
FEATURE_SIZE=${FEATURE_SIZE:-32} CROSS_FEATURE_SIZE=${CROSS_FEATURE_SIZE:-128}
BEAM=${BEAM:-4} LENPEN=${LENPEN:-0.6}

t2r_mt_main
