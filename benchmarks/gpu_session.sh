#!/usr/bin/env bash
# The GPU measurements, one step per device call (a call may run 10 minutes at most). After
# `bash benchmarks/gpu_prepare.sh` here, each call is
#   bash benchmarks/gpu_session.sh STEP        with carry [".whl", ".data"]
# Steps, in order of value; each writes its table under $OUT (or benchmarks/results):
#   speedrun   SimCLR R18 CIFAR-10 200 epochs, device views, bf16, channels-last (the layout
#              tensor cores use): the 10-minute goal
#   plain      the same in NCHW (what channels-last gains)
#   fast       the same with channels-last and a compiled backbone
#   throughput views alone and training steps: PIL in workers vs device views (+compiled)
#   pil        the 200-epoch run with lightly's PIL views in 8 workers (for comparison)
#   fsdp1      50 steps of DINO under configs/trainer/fsdp.yaml (Lightning runs FSDP1 on GPUs only)
#   tier M..   the lightly-protocol table for methods M.. (200 epochs each: one or two per call)
set -euo pipefail
cd "$(dirname "$0")/.."
STEP=${1:?usage: bash benchmarks/gpu_session.sh STEP [METHODS...]}
shift
DATA=${DATA:-.data/cifar10-jpg.tar.gz}
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# a call may run 10 minutes: a 200-epoch run still going at BUDGET_MIN is stopped and reported
# with the step it reached and its pace (its metrics.csv is copied beside the tables under $OUT either way)
speedrun=(python3 benchmarks/speedrun.py --data "$DATA" --out "$RESULTS" --budget-min "${BUDGET_MIN:-9}")
case "$STEP" in
  speedrun) "${speedrun[@]}" --channels-last ;;
  plain) "${speedrun[@]}" ;;
  fast) "${speedrun[@]}" --fast ;;
  pil) "${speedrun[@]}" --pil ;;
  throughput)
    kornia=$(python3 -c "import kornia" 2>/dev/null && echo --kornia || true)
    python3 benchmarks/augment_throughput.py --data "$DATA" --batch-size 512 --workers 8 \
      --compile-views --step $kornia | tee "$RESULTS/augment-throughput-gpu.md"
    python3 benchmarks/augment_throughput.py --data "$DATA" --batch-size 512 --workers 8 \
      --step --precision bf16 --channels-last --devices cuda | tee -a "$RESULTS/augment-throughput-gpu.md"
    python3 benchmarks/data_loading.py --data "$DATA" --workers 8 | tee "$RESULTS/data-loading-gpu-host.md" ;;
  fsdp1)
    python3 -m sslzoo fit --config configs/cifar10/dino.yaml --config configs/trainer/fsdp.yaml \
      --data.root "$DATA" --trainer.devices 1 --trainer.max_steps 50 \
      --trainer.check_val_every_n_epoch 1000 --trainer.default_root_dir "$RESULTS/runs/fsdp1" ;;
  tier)
    python3 benchmarks/cifar10.py --tier gpu --data "$DATA" --out "$RESULTS" \
      --set trainer.precision=bf16-mixed --methods "$@" ;;
  *) echo "unknown step $STEP" >&2; exit 2 ;;
esac
