#!/usr/bin/env bash
# Everything a GPU session should measure, in order of value; each step writes its own table.
#   bash benchmarks/gpu_session.sh DATA      (DATA: CIFAR-10 root, ImageFolder copy or .tar.gz)
set -euo pipefail
DATA=${1:?usage: bash benchmarks/gpu_session.sh DATA}
cd "$(dirname "$0")/.."
# 1. augmentation throughput: lightly PIL views in workers vs per-image views on the GPU
python benchmarks/augment_throughput.py --data "$DATA" --batch-size 512 --compile-views --step
python benchmarks/augment_throughput.py --data "$DATA" --batch-size 512 --compile-views --step --precision bf16 --channels-last
# 2. the speed goal: SimCLR, ResNet-18 CIFAR stem, batch 512, 200 epochs, device augmentation
python benchmarks/cifar10.py --tier gpu --data "$DATA" --methods simclr \
  --set data.device_augment=true --set trainer.precision=bf16-mixed
python benchmarks/cifar10.py --tier gpu --data "$DATA" --methods simclr --out benchmarks/results/fast \
  --set data.device_augment=true --set trainer.precision=bf16-mixed \
  --set trainer.callbacks+=sslzoo.callbacks.ChannelsLast --set trainer.callbacks+=sslzoo.callbacks.CompileBackbone
# 3. the lightly-protocol table for every method (ResNet-18 / ViT-S, 200 epochs)
python benchmarks/cifar10.py --tier gpu --data "$DATA" --set data.device_augment=true
# 4. DINO ViT-B memory per rank, counted (the GPU figure comes from peak memory in step 3)
python benchmarks/memory.py
