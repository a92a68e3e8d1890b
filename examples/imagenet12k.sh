#!/usr/bin/env bash
# imagenet-12k-wds style: relabel a pool into the ImageNet-12k label space, keep the largest
# classes with V validation images each, near-duplicates removed, pre-shuffled shards, then
# train a classifier on the hard top-1 labels (ce) and evaluate it.
#
# The published set: CLASSES=11821 VAL=40 SHARDS="train=1024,validation=64" (images under 48 px
# dropped and the shortest edge capped at 600 at ingest), e.g.
#   POOL=data/pool CLASSES=11821 VAL=40 MIN_TRAIN=1 SHARDS="train=1024,validation=64" \
#   MODEL=vit_base_patch16_224 IMG=224 STEPS=... BATCH=256 LAUNCH="torchrun --nproc-per-node 8" \
#   bash examples/imagenet12k.sh
# Defaults run in a minute or two on a laptop CPU over `make demo`'s output.
set -euo pipefail
SL=${SL:-silverlabel}
LAUNCH=${LAUNCH:-}
POOL=${POOL:-demo-output/pool}
OUT=${OUT:-examples-output/imagenet12k}
CLASSES=${CLASSES:-8}; VAL=${VAL:-2}; MIN_TRAIN=${MIN_TRAIN:-3}; MIN_PROB=${MIN_PROB:-0}
SHARDS=${SHARDS:-train=4,validation=1}
MODEL=${MODEL:-resnet10t}; IMG=${IMG:-64}; STEPS=${STEPS:-30}; BATCH=${BATCH:-32}; WORKERS=${WORKERS:-0}
mkdir -p "$OUT"
run() { if [ -n "$LAUNCH" ]; then $LAUNCH -m silverlabel.cli "$@"; else $SL "$@"; fi; }

$SL select "$POOL" -o "$OUT/sel" --label-space in12k --min-prob "$MIN_PROB" --top-classes "$CLASSES" \
  --val-per-class "$VAL" --min-train-per-class "$MIN_TRAIN" --dedupe phash:8
$SL shard "$OUT/sel" -o "$OUT/trainset" --shards "$SHARDS" --name imagenet12k
run train "$OUT/trainset" -o "$OUT/run" --model "$MODEL" --img-size "$IMG" --batch-size "$BATCH" \
  --steps "$STEPS" --lr 2e-3 --warmup-steps $((STEPS / 10)) --loss ce --label-smoothing 0.1 \
  --workers "$WORKERS" --no-progress
$SL eval "$OUT/run" --data "$OUT/trainset" --no-progress
echo "imagenet12k: training set $OUT/trainset (timm: --dataset wds/imagenet12k), run $OUT/run"
