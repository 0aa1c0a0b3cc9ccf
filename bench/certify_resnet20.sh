#!/usr/bin/env bash
# First certified-robustness measurement (#37) at the cpu budget, a preliminary n=100: ResNet-20 trained with
# --defense masking (1 epoch, 20000 images) against the undefended QAT model the defense table trained (seed 0, same
# budget; run `python bench/defense_table.py --budget cpu --seeds 0 --rows none --bits 4 --configs "10x10 sq"` first).
# PatchCleanser double masking, 6 mask positions per axis, 4x4 and 6x6 patches, float and 4 bits. About 25 CPU-minutes.
set -e
D=../shared/data/cifar10; W=../shared/data/weights/resnet20-12fca82f.th
QAT=$(ls -d runs/defense_equal_compute/none_s0_*/ | head -1)model.pt
[ -f runs/certify/masking/model.pt ] || qnn train --model resnet20 --dataset cifar10 --data-dir $D --init $W --bits 2,4,8,32 \
    --epochs 1 --lr 0.02 --train-subset 20000 --test-subset 2000 --batch-size 128 --seed 0 --defense masking \
    --mask-patch-size 6 --mask-positions 6 --no-progress --out runs/certify/masking --resume
for m in masking qat; do
  ck=runs/certify/masking/model.pt; [ $m = qat ] && ck=$QAT
  qnn certify --checkpoint $ck --dataset cifar10 --data-dir $D --bits 32,4 --patch-size 4,6 --mask-positions 6 \
      --method patchcleanser --n 100 --out results/certify_resnet20_$m --overwrite
done
