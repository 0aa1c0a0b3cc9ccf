#!/usr/bin/env bash
# Certified robustness of ResNet-20 on CIFAR-10 at the cpu budget (#37): the masking-trained switchable model (1 epoch,
# 20000 images, as the defense table's rows) against the undefended QAT model the defense table trained (seed 0, same
# budget; `python bench/defense_table.py --budget cpu --seeds 0 --rows none --bits 4 --configs "10x10 sq"` makes it).
# Then bench/certify_table.py: both methods, 32/8/4/2 bits, 4x4 and 6x6 patches, 1000 images, PyTorch == ORT per
# image, cross-checks. Resumes cell by cell; a few CPU-hours in all.
set -e
D=../shared/data/cifar10; W=../shared/data/weights/resnet20-12fca82f.th
[ -f runs/certify/masking/model.pt ] || qnn train --model resnet20 --dataset cifar10 --data-dir $D --init $W --bits 2,4,8,32 \
    --epochs 1 --lr 0.02 --train-subset 20000 --test-subset 2000 --batch-size 128 --seed 0 --defense masking \
    --mask-patch-size 6 --mask-positions 6 --no-progress --out runs/certify/masking --resume
python bench/certify_table.py --masking runs/certify/masking/model.pt --data-dir $D --out results/certify_resnet20 "$@"
