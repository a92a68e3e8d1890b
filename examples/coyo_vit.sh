#!/usr/bin/env bash
# COYO-ViT, scaled down: pretrain a ViT with sigmoid BCE on machine labels (multi-hot top-k
# over ImageNet-21k), fine-tune it at a higher resolution on a labeled downstream set,
# evaluate top-1/top-5 and ReaL-style accuracy, then low-shot probes.
#
# The paper's recipe (COYO-Labeled-300M -> ViT-L/16 -> ImageNet-1k at 384/512 px):
#   POOL=data/coyo-labeled MODEL=vit_large_patch16_224 PRE_SIZE=224 FT_SIZE=384 \
#   PRE_STEPS=... BATCH=128 ACCUM=4 LAUNCH="torchrun --nproc-per-node 8" (4096 a step) FT_SET=data/in1k-trainset \
#   REAL=imagenet_real_labels.json bash examples/coyo_vit.sh
# Defaults run in a few minutes on a laptop CPU over `make demo`'s output. OUT should be a new
# folder: the train steps refuse to overwrite a run (RESUME=1 continues an interrupted one).
#
# Multi-GPU / multi-node: set LAUNCH="torchrun --nproc-per-node 8" (add --nnodes,
# --rdzv-endpoint for several hosts); every rank reads the same shards, split by the loader.
set -euo pipefail
SL=${SL:-silverlabel}
LAUNCH=${LAUNCH:-}
POOL=${POOL:-demo-output/pool}              # an ingested + labeled dataset (silverlabel label)
OUT=${OUT:-examples-output/coyo-vit}
MODEL=${MODEL:-vit_tiny_patch16_224}
PRE_SIZE=${PRE_SIZE:-64}; FT_SIZE=${FT_SIZE:-96}
PRE_STEPS=${PRE_STEPS:-40}; FT_STEPS=${FT_STEPS:-20}
BATCH=${BATCH:-32}; ACCUM=${ACCUM:-1}; WORKERS=${WORKERS:-0}   # BATCH is per GPU: global = BATCH x ACCUM x GPUs
THRESHOLD=${THRESHOLD:-}                    # bce-multihot: only labels with prob >= t (COYO users pick it)
FT_SET=${FT_SET:-}                          # downstream labeled training set; default: built from POOL
REAL=${REAL:-}                              # ReaL label sets (JSON); default: the teacher's, built from FT_SET
mkdir -p "$OUT"
run() { if [ -n "$LAUNCH" ]; then $LAUNCH -m silverlabel.cli "$@"; else $SL "$@"; fi; }

# 1. the pretraining set: every labeled image, its top-k in ImageNet-21k, pre-shuffled shards
$SL select "$POOL" -o "$OUT/pretrain-sel" --dedupe phash:4
$SL shard "$OUT/pretrain-sel" -o "$OUT/pretrain-set" --samples-per-shard 64 --name coyo

# 2. pretrain: sigmoid BCE on the multi-hot top-k, head bias -10
run train "$OUT/pretrain-set" -o "$OUT/pretrain" --model "$MODEL" --img-size "$PRE_SIZE" \
  --batch-size "$BATCH" --accum-steps "$ACCUM" ${RESUME:+--resume} --steps "$PRE_STEPS" --lr 1e-3 --warmup-steps $((PRE_STEPS / 10)) \
  --weight-decay 0.1 --loss bce-multihot ${THRESHOLD:+--label-threshold "$THRESHOLD"} \
  --workers "$WORKERS" --no-progress

# 3. the downstream set (default: the pool's 8 largest ImageNet-1k classes, 2 validation images each)
if [ -z "$FT_SET" ]; then
  $SL select "$POOL" -o "$OUT/ft-sel" --label-space in1k --top-classes "${FT_CLASSES:-8}" --val-per-class "${FT_VAL:-2}" \
    --min-train-per-class "${FT_MIN_TRAIN:-3}" --dedupe phash:4
  $SL shard "$OUT/ft-sel" -o "$OUT/ft-set" --samples-per-shard 64 --name ft
  FT_SET="$OUT/ft-set"
fi
if [ -z "$REAL" ]; then
  python "$(dirname "$0")/teacher_label_sets.py" "$FT_SET" --min-prob 0.05 -o "$OUT/real_labels.json"
  REAL="$OUT/real_labels.json"
fi

# 4. fine-tune at a higher resolution: new head, position embeddings resampled
run train "$FT_SET" -o "$OUT/finetune" --model "$MODEL" --img-size "$FT_SIZE" --batch-size "$BATCH" ${RESUME:+--resume} \
  --steps "$FT_STEPS" --lr 5e-4 --warmup-steps $((FT_STEPS / 10)) --loss ce --label-smoothing 0.1 \
  --init "$OUT/pretrain/checkpoint-final.pt" --ema-decay 0.99 --workers "$WORKERS" --no-progress

# 5. evaluate: top-1/top-5 and ReaL-style, plus low-shot probes of the pretrained model
$SL eval "$OUT/finetune" --data "$FT_SET" --real-labels "$REAL" --no-progress
$SL eval "$OUT/pretrain" --data "$FT_SET" --lowshot ${LOWSHOT:-0.1 0.25} --lowshot-modes probe finetune \
  --ft-steps "$FT_STEPS" --ft-lr 5e-4 --batch-size "$BATCH" --no-progress
echo "coyo-vit: runs in $OUT (pretrain/, finetune/, pretrain/lowshot/)"
