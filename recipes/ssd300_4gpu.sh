#!/usr/bin/env bash
# SSD300 on 4 GPU(s) per node: batch 64/GPU, base lr 2.6e-3, warmup 300 iterations, AMP.
set -euo pipefail
DATA=${DATA:?set DATA to a COCO 2017 folder}
SAVE=${SAVE:-runs/ssd300_4gpu}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER=${MASTER:-127.0.0.1:29500}
cd "$(dirname "$0")/.."
exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node=4 \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER" --rdzv_id=ssd300 \
    training/train.py --data "$DATA" --save "$SAVE" \
    --batch-size 64 --learning-rate 2.6e-3 --warmup 300 --amp \
    --epochs 65 --multistep 43 54 --evaluation 21 31 37 42 48 53 59 64 \
    ${BACKBONE:+--backbone-path "$BACKBONE"} "$@"
