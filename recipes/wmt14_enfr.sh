#!/usr/bin/env bash
# WMT14 EN-FR (newstest2014): softmax teacher -> T2R swap, calibrate, finetune -> BLEU (Kasai et al. 2021, Table 2).
#
#   bash recipes/wmt14_enfr.sh [--out DIR] [--stages prep,teacher,calibrate,finetune,eval] [--force] [--dry-run]
#
# Stages (each skipped when $OUT/.done/<stage> exists; --force redoes the listed stages):
#   prep      data-prep/wmt14_enfr.sh (Moses + BPE; with the public teacher: its BPE codes) and
#             fairseq-preprocess (with the public teacher: its joined dictionary) -> $OUT/data-bin
#   teacher   TEACHER=download (default): fairseq's public transformer.wmt14.en-fr (Ott et al. 2018: big
#             transformer on WMT14 EN-FR, joined dictionary); TEACHER=train: train transformer_vaswani_wmt_en_fr_big
#             on our own data (configs/wmt14_enfr_teacher.yaml)
#   calibrate SWAP=calibrated (default, the README's recommended recipe): python -m t2r_fairseq.tools.convert
#             on the teacher (--feature-map t2r_qk --feature-size $FEATURE_SIZE and --softmax-cross-attention, or
#             with CROSS_ATTENTION=linear --cross-feature-size $CROSS_FEATURE_SIZE): the swap of the decoder
#             self-attention (and cross-attention), then each new feature map fitted to the teacher's softmax attention
#             -> $OUT/checkpoints/calibrated.pt (log $OUT/logs/calibrate.log); one process on node 0, on a GPU
#             unless CPU=1. SWAP=plain: nothing to do
#   finetune  finetune t2r_transformer_vaswani_wmt_en_fr_big (configs/wmt14_enfr_finetune.yaml) from the calibrated
#             checkpoint with the t2r_qk map and --feature-map-lr-scale 8; SWAP=plain: from the teacher itself
#             (the swap happens as it loads) with the paper's map and one learning rate
#             (model.feature_map=t2r model.feature_map_lr_scale=1.0); interrupted? run it again: fairseq resumes
#             from $OUT/checkpoints/t2r/checkpoint_last.pt
#   eval      fairseq-generate --beam $BEAM --lenpen $LENPEN on newstest2014, detokenised sacreBLEU against
#             the raw reference (signature printed) and tokenised BLEU (the convention of the paper's table)
#
# Options: --out DIR (default runs/wmt14_enfr; env WORK), --stages LIST (env STAGES), --force (env FORCE=1),
#          --dry-run (env DRY_RUN=1: print the exact commands, one per line, run nothing), -h/--help.
# Environment (defaults in brackets):
#   TEACHER [download] | train        TEACHER_CKPT   use this softmax checkpoint instead
#   TEACHER_URL [fairseq's archive]  TEACHER_SHA256  verify the archive (we know of no published checksum)
#   NUM_GPUS [8]  NUM_NODES [1]  NODE_RANK [0]  MASTER_ADDR [localhost]  MASTER_PORT [29500]
#   LAUNCHER [auto] | spawn | torchrun | srun     CPU [0]  CPU_PROCS [1]  (CPU=1: gloo, for smoke tests)
#   MAX_UPDATE [30000] finetune updates   TEACHER_MAX_UPDATE [300000]   MAX_TOKENS [3584] per GPU
#   UPDATE_FREQ [config x 8 / world size]   FEATURE_SIZE [32]
#   BPE_TOKENS [40000] (TEACHER=train)  BEAM [4]  LENPEN [0.6]  EVAL_MODELS ["teacher t2r"]
#   EVAL_CHECKPOINT [checkpoint_best.pt]  EVAL_MAX_TOKENS [8000]  PREP_WORKERS [8]
#   PREP_ARGS   extra options for data-prep/wmt14_enfr.sh (see its --help)
#   SWAP [calibrated] | plain   the swap: the README's recommended recipe (calibrate stage, then finetune from its
#             checkpoint with t2r_qk and the maps' 8x learning rate; ahead of the paper's recipe at the same budget in
#             docs/RESULTS.md) or the paper's plain swap (no calibration; t2r map, one learning rate): docs/PAPER.md
#   CROSS_ATTENTION [softmax] | linear   the encoder-decoder attention: fairseq's own softmax over the cached source
#             (the default: within 0.3 BLEU of the teacher finetuned the same way, as fast at sentence level) or
#             kernelised with CROSS_FEATURE_SIZE [128] features (the paper's; the default with SWAP=plain; a state
#             constant in the source length too, for long sources): docs/OPTIONS.md
#   CALIBRATE_STEPS [300] Adam steps per layer (0: the swap alone)   CALIBRATE_WAIT [3600] s a node other than
#             node 0 waits for its calibrated checkpoint   CALIBRATE_ARGS   extra tools.convert options, e.g.
#             "--calibrate-batches 8 --max-tokens 2048" (see python -m t2r_fairseq.tools.convert --help)
#   TRAIN_OVERRIDES / TEACHER_OVERRIDES / FINETUNE_OVERRIDES   extra hydra overrides, e.g. "model.dropout=0.2"
#   T2R_DATA_MIRROR, T2R_DATA_CHECKSUMS   read by data-prep/download.py (local mirror, checksum table)
# Slurm: recipes/slurm/wmt14_enfr.sbatch. Where each default comes from: recipes/configs/wmt14_enfr_*.yaml.
set -euo pipefail
RECIPE=wmt14_enfr DEFAULT_STAGES=prep,teacher,calibrate,finetune,eval
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
t2r_parse_args "$@"

SRC=en TGT=fr DATA_PREP=wmt14_enfr.sh SEGMENT=bpe COMPOUND_SPLIT=0 TOKENISED_BLEU=1
TEACHER=${TEACHER:-download}
TEACHER_URL=${TEACHER_URL:-https://dl.fbaipublicfiles.com/fairseq/models/wmt14.en-fr.joined-dict.transformer.tar.bz2}
TEACHER_ARCHIVE_DIR=wmt14.en-fr.joined-dict.transformer
TEACHER_CONFIG=wmt14_enfr_teacher FINETUNE_CONFIG=wmt14_enfr_finetune REF_WORLD=8
BPE_TOKENS=${BPE_TOKENS:-40000}
MAX_UPDATE=${MAX_UPDATE:-30000} TEACHER_MAX_UPDATE=${TEACHER_MAX_UPDATE:-300000} MAX_TOKENS=${MAX_TOKENS:-3584}
FEATURE_SIZE=${FEATURE_SIZE:-32}
BEAM=${BEAM:-4} LENPEN=${LENPEN:-0.6}

t2r_mt_main
