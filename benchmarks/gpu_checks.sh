#!/usr/bin/env bash
# Every GPU check and benchmark of the project, run in the order named (about 6 minutes on an H100):
#   gpu-tests       the gpu-marked tests (Triton kernels at real shapes, GPU decoding, CUDA model paths)
#   gpu-train       a real DeepSpeed training run on the GPU (NCCL, bf16-autocast, impl auto, GPU JPEG
#                   decode) started by launch/deepspeed.sh, then `sst-dist eval` of its best checkpoint
#   kernels         kernels/bench.py: each Triton kernel vs the fused torch form vs the reference
#   gpu-step        benchmarks/gpu_step.py: the full step, impl reference vs fused vs triton, and the
#                   backbone-only step (B=32, bf16-autocast)
#   gpu-step-base   the same on the code before issue 12 (build/base-src.tgz, carried:
#                   `git archive f61a274 | gzip > build/base-src.tgz`)
#   sync-check      benchmarks/gpu_sync_check.py: training steps under
#                   torch.cuda.set_sync_debug_mode("error") (issue 12: no host sync off logging steps)
#   profile, profile-autocast, profile-fp32
#                   `sst-dist profile` at the COCO shape (ResNet-101, 448 px, B=32) under bf16,
#                   bf16-autocast and fp32
#   profile-autocast-base   profile-autocast on the code before issue 12 (build/base-src.tgz)
#   dali-decode     benchmarks/loader.py, DALI mixed decoding vs torchvision nvJPEG at 448 from 640x480
#                   JPEGs, once scripts/device_wheel.sh has installed DALI into $DALI_SITE
#   gpu-step-trunk  gpu_step.py with the trunk eager, torch.compile'd and BN-folded, side by side
# Default: gpu-tests gpu-train kernels gpu-step gpu-step-base sync-check profile profile-autocast
# profile-fp32. Each step has its own time limit, capped by what is left of BUDGET_S (default 480 s,
# the issue's 8 minutes) for the whole call; a step with under 30 s left is skipped and says so.
# A failing step does not stop the next. After every step the logs, JSON and the summary so far are
# packed into ${OUT:-benchmarks/results}/gpu-results.tgz (checkpoints left out), so a call killed
# at its limit still returns what it finished. Results stay in $GPU_RESULTS (default /tmp/sst-gpu).
# Packages the image lacks (deepspeed, webdataset, pycocotools, ...) travel as wheels in .whl/
# (docs/performance.md, "GPU checks"); DALI's wheel travels in pieces (scripts/device_wheel.sh).
# Usage: [BUDGET_S=N] bash benchmarks/gpu_checks.sh [STEP ...]   (PYTHON=... picks the interpreter)
# Exit status: 0 when every named step passed, 1 otherwise, 2 for an unknown step name.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# each call writes into its own folder (a rerun on a warm machine refuses nothing and replaces
# nothing); the generated data is shared by the calls of one machine
RES_ROOT=${GPU_RESULTS:-/tmp/sst-gpu}
RES=$RES_ROOT/call-$(date +%H%M%S)-$$
DEST=${OUT:-benchmarks/results}
BUDGET_S=${BUDGET_S:-480}
MIN_STEP_S=30
STEPS=${*:-gpu-tests gpu-train kernels gpu-step gpu-step-base sync-check profile profile-autocast profile-fp32}
DALI_SITE=${DALI_SITE:-/tmp/site-dali}
declare -A result

pack() {  # the summary so far and everything a step wrote, into $DEST/gpu-results.tgz
  { echo "== summary (${card:-no card}, $day; BUDGET_S=$BUDGET_S, ${SECONDS}s used)"
    for name in $STEPS; do echo "$name: ${result[$name]:-not run}"; done; } >"$RES/summary.txt"
  tar czf "$DEST/gpu-results.tgz.tmp" -C "$RES" --exclude=checkpoints --exclude='*.pt' \
    --exclude=data --exclude=base-data --exclude=tensorboard --exclude='trace-*.json' \
    --exclude=gpu-profile . && mv "$DEST/gpu-results.tgz.tmp" "$DEST/gpu-results.tgz"
}

step() {  # step NAME SECONDS COMMAND...: run within its limit and the budget, log to $RES/NAME.log
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET_S - SECONDS))
  if ((left < MIN_STEP_S)); then
    echo "== $name skipped: ${left}s of BUDGET_S=${BUDGET_S} left"
    result[$name]="skipped (budget: ${left}s left)"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$RES/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$RES/$name.log"
  result[$name]="rc=$rc $((SECONDS - t0))s"
}

base_tree() {  # the code before issue 12, unpacked once into /tmp/base
  [ -d /tmp/base/sst_dist ] && return 0
  [ -f build/base-src.tgz ] || return 1
  mkdir -p /tmp/base && tar xzf build/base-src.tgz -C /tmp/base
}
base_path() { echo "/tmp/base${PYTHONPATH#$PWD}"; }  # the base tree's package first
no_base() { result[$1]="rc=2 (no build/base-src.tgz carried)"; }

# the COCO shape on synthetic 80-class scenes (generated once into $SST_DATA_ROOT)
PROFILE="launch/configs/coco2014.yaml model.pretrained=null data.synthetic.enabled=true \
data.synthetic.num_classes=80 data.synthetic.image_size=448 data.synthetic.num_train=320 \
data.synthetic.num_test=32 data.backend=torch-gpu data.num_workers=8 train.batch_size=32"
GPU_STEP="benchmarks/gpu_step.py --batch 32 --repeats 8"

run_gpu_tests() { step gpu-tests 100 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests; }
run_gpu_train() {
  step gpu-train 110 bash -c "launch/deepspeed.sh --num-gpus 1 launch/configs/demo.yaml \
    train.precision=bf16-autocast data.backend=torch-gpu data.num_workers=4 output.name=gpu-demo \
    && $PY -m sst_dist.cli eval $RES/runs/gpu-demo/checkpoints/best --out $RES/gpu-eval"
}
# --no-compile: torch.compile of the chunked torch forms takes minutes per form on its own
run_kernels() { step kernels 150 "$PY" -m kernels.bench --no-compile --iters 10 --out "$RES"; }
run_gpu_step() { step gpu-step 100 "$PY" $GPU_STEP --out "$RES/gpu-step-$card-$day.json"; }
run_gpu_step_base() {
  base_tree || { no_base gpu-step-base; return; }
  step gpu-step-base 100 env PYTHONPATH="$(base_path)" bash -c \
    "cd /tmp/base && $PY $GPU_STEP --out $RES/gpu-step-base-$card-$day.json"
}
run_sync_check() { step sync-check 90 "$PY" benchmarks/gpu_sync_check.py --steps 6; }
run_gpu_step_trunk() {  # do compiling the trunk or folding its frozen BNs pay?
  step gpu-step-trunk 240 "$PY" $GPU_STEP --impls triton --compile-trunk --fold-bn \
    --out "$RES/gpu-step-trunk-$card-$day.json"
}
run_dali_decode() {
  step dali-decode 150 env PYTHONPATH="$DALI_SITE:$PYTHONPATH" \
    "$PY" benchmarks/loader.py --images 200 --workers 4 --batch-size 32 --repeats 2 --out "$RES"
}
profile() {  # profile NAME PRECISION: the COCO-shape step under one precision recipe
  step "$1" 80 "$PY" -m sst_dist.cli profile $PROFILE "train.precision=$2" output.name="$1" \
    --out "$RES/$1" --steps 8 --profile-steps 2
}
run_profile() { profile profile bf16; }
run_profile_autocast() { profile profile-autocast bf16-autocast; }
run_profile_fp32() { profile profile-fp32 fp32; }
run_profile_autocast_base() {  # own data and run roots, so neither tree reads the other's shards
  base_tree || { no_base profile-autocast-base; return; }
  step profile-autocast-base 100 env SST_DATA_ROOT="$RES_ROOT/base-data" SST_OUTPUT_ROOT="$RES/base-runs" \
    PYTHONPATH="$(base_path)" bash -c "cd /tmp/base && $PY -m sst_dist.cli profile $PROFILE \
    train.precision=bf16-autocast output.name=profile-autocast-base --out $RES/profile-autocast-base \
    --steps 8 --profile-steps 2"
}

for name in $STEPS; do
  declare -F "run_${name//-/_}" >/dev/null || { echo "gpu_checks.sh: unknown step '$name'" >&2; exit 2; }
done
mkdir -p "$RES" "$DEST"
if compgen -G ".whl/*.whl" >/dev/null && ! "$PY" -c "import deepspeed" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 SST_VENV=/nonexistent
export SST_DATA_ROOT=$RES_ROOT/data SST_OUTPUT_ROOT=$RES/runs
day=$(date +%F)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$RES/gpu-card.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 \
  | tee -a "$RES/gpu-card.txt"
card=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))" 2>/dev/null || echo cpu)

for name in $STEPS; do
  "run_${name//-/_}"
  pack
done
cat "$RES/summary.txt"
ls -la "$DEST/gpu-results.tgz"
status=0
for name in $STEPS; do [[ ${result[$name]:-} == rc=0* ]] || status=1; done
exit $status
