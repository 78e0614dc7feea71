#!/usr/bin/env bash
# Prepare a GPU session, here in the repository root: wheels of the packages the GPU image
# lacks into .whl, CIFAR-10 into .data (both git-ignored locally; each device run names them
# in `carry`, and benchmarks/gpu_session.sh installs the wheels):
#   source .venv/bin/activate && bash benchmarks/gpu_prepare.sh [CIFAR10_ARCHIVE]
set -euo pipefail
cd "$(dirname "$0")/.."
ARCHIVE=${1:-../shared/data/cifar10-jpg.tar.gz}
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for d in /.whl/ /.data/; do grep -qx "$d" "$exclude" 2>/dev/null || echo "$d" >> "$exclude"; done
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
# The image has torch, lightning, timm, torchmetrics, torchvision, scikit-learn, tensorboard,
# safetensors, matplotlib and PyYAML. The versions installed here of what it lacks
# (hydra-core, which lightly imports only for its own CLI, is left out):
# kornia (the `bench` extra) only for the throughput comparison, where it is installed here.
pins=$(python3 -c "from importlib.metadata import version as v, PackageNotFoundError
names = ['lightly', 'jsonargparse', 'docstring-parser', 'typeshed-client']
try:
    v('kornia')
    names += ['kornia', 'kornia-rs']
except PackageNotFoundError:
    pass
print(' '.join(f'{n}=={v(n)}' for n in names))")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl $pins
mkdir -p .data && cp "$ARCHIVE" .data/cifar10-jpg.tar.gz
du -sh .whl .data
