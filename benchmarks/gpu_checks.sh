#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one call (about 6 minutes on an H100):
#   1. the gpu-marked tests (kernels at real shapes, GPU decoding, CUDA model paths);
#   2. kernels/bench.py: each Triton kernel vs reference vs torch.compile, fwd and fwd+bwd;
#   3. benchmarks/gpu_step.py: the full training step, impl reference vs fused vs triton (bf16).
# Results (JSON, logs) go to $OUT (the device tool's folder) or benchmarks/results.
# Usage: bash benchmarks/gpu_checks.sh   (PYTHON=... to pick the interpreter; runs from the repo)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$DEST/gpu-card.txt"
echo "== 1/3 gpu tests"
timeout 150 "$PY" -m pytest -q -m gpu tests 2>&1 | tee "$DEST/gpu-tests.log" || status=1
echo "== 2/3 kernel checks and benchmark"
timeout 200 "$PY" -m kernels.bench --budget-s 90 --out "$DEST" 2>&1 \
  | tee "$DEST/kernels.log" || status=1
echo "== 3/3 full training step"
card=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
timeout 150 "$PY" benchmarks/gpu_step.py --out "$DEST/gpu-step-$card-$(date +%F).json" 2>&1 \
  | tee "$DEST/gpu-step.log" || status=1
exit $status
