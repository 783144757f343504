#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one call (about 6 minutes on an H100):
#   1. the gpu-marked tests (Triton kernels at real shapes, GPU decoding, CUDA model paths);
#   2. a real DeepSpeed training run on the GPU (NCCL, bf16-autocast, impl auto, GPU JPEG decode),
#      started by launch/deepspeed.sh, then `sst-dist eval` of its best checkpoint;
#   3. kernels/bench.py: each Triton kernel vs the fused torch form vs the reference;
#   4. benchmarks/gpu_step.py: the full training step, impl reference vs fused vs triton (bf16);
#   5. `sst-dist profile` at the COCO shape (ResNet-101, 448 px, B=32) under bf16, bf16-autocast
#      and fp32 (steps profile, profile-autocast, profile-fp32);
#   6. sync-check: benchmarks/gpu_sync_check.py, training steps under
#      torch.cuda.set_sync_debug_mode("error") (issue 12: no host sync outside logging steps);
#   7. gpu-step-base: the same gpu_step.py run on the code before issue 12 (build/base-src.tgz,
#      `git archive f61a274 | gzip > build/base-src.tgz`, carried), beside step 4 in this call;
#   8. dali-decode: benchmarks/loader.py, DALI mixed decoding vs torchvision nvJPEG at 448 from
#      640x480 JPEGs, once scripts/device_wheel.sh has installed DALI into $DALI_SITE;
#   9. gpu-step-trunk (opt-in): gpu_step.py with the trunk eager, torch.compile'd and with its frozen
#      BatchNorms folded into the convolutions, side by side;
#  10. profile-autocast-base (opt-in): `sst-dist profile` of the code before issue 12 (bf16-autocast,
#      the COCO shape), to read beside profile-autocast for the model-step and end-to-end targets.
# Each step has its own time limit, and a failing step does not stop the next.
# Results go to $GPU_RESULTS (default /tmp/sst-gpu) and are packed into
# ${OUT:-benchmarks/results}/gpu-results.tgz (checkpoints left out); the summary is printed last.
# Packages the image lacks (deepspeed, webdataset, pycocotools, ...) travel as wheels in .whl/
# (see docs/performance.md, "GPU checks"); DALI's wheel travels in pieces (scripts/device_wheel.sh).
# Usage: bash benchmarks/gpu_checks.sh [STEP ...]   (default: all; PYTHON=... picks the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RES=${GPU_RESULTS:-/tmp/sst-gpu}
DEST=${OUT:-benchmarks/results}
mkdir -p "$RES" "$DEST"
if compgen -G ".whl/*.whl" >/dev/null && ! "$PY" -c "import deepspeed" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 SST_VENV=/nonexistent
export SST_DATA_ROOT=$RES/data SST_OUTPUT_ROOT=$RES/runs
declare -A result

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $RES/NAME.log, record pass/fail
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$RES/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$RES/$name.log"
  result[$name]="rc=$rc $((SECONDS - t0))s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RES/gpu-card.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$RES/gpu-card.txt"
card=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
day=$(date +%F)

want() { [[ " $STEPS " == *" $1 "* ]]; }
STEPS=${*:-gpu-tests gpu-train kernels gpu-step gpu-step-base sync-check profile profile-autocast profile-fp32}
# the COCO shape on synthetic 80-class scenes (generated once into $SST_DATA_ROOT)
PROFILE=(launch/configs/coco2014.yaml model.pretrained=null data.synthetic.enabled=true
  data.synthetic.num_classes=80 data.synthetic.image_size=448 data.synthetic.num_train=320
  data.synthetic.num_test=32 data.backend=torch-gpu data.num_workers=8 train.batch_size=32)

want gpu-tests && step gpu-tests 100 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
want gpu-train && step gpu-train 110 bash -c "launch/deepspeed.sh --num-gpus 1 launch/configs/demo.yaml \
    train.precision=bf16-autocast data.backend=torch-gpu data.num_workers=4 output.name=gpu-demo \
  && $PY -m sst_dist.cli eval $RES/runs/gpu-demo/checkpoints/best --out $RES/gpu-eval"
# --no-compile: torch.compile of the chunked torch forms takes minutes per form on its own
want kernels && step kernels 150 "$PY" -m kernels.bench --no-compile --iters 10 --out "$RES"
want gpu-step && step gpu-step 100 "$PY" benchmarks/gpu_step.py --batch 32 --repeats 8 \
  --out "$RES/gpu-step-$card-$day.json"
want sync-check && step sync-check 90 "$PY" benchmarks/gpu_sync_check.py --steps 6
# opt-in (not in the default list): do compiling the trunk or folding its frozen BNs pay? same call
want gpu-step-trunk && step gpu-step-trunk 240 "$PY" benchmarks/gpu_step.py --batch 32 --repeats 8 \
  --impls triton --compile-trunk --fold-bn --out "$RES/gpu-step-trunk-$card-$day.json"
if want gpu-step-base; then  # the code before issue 12, same script and arguments, same call
  rm -rf /tmp/base && mkdir -p /tmp/base && tar xzf build/base-src.tgz -C /tmp/base \
    && step gpu-step-base 100 env PYTHONPATH=/tmp/base${PYTHONPATH#$PWD} bash -c "cd /tmp/base && \
      $PY benchmarks/gpu_step.py --batch 32 --repeats 8 --out $RES/gpu-step-base-$card-$day.json" \
    || result[gpu-step-base]="rc=2 (no build/base-src.tgz carried)"
fi
DALI_SITE=${DALI_SITE:-/tmp/site-dali}
want dali-decode && step dali-decode 150 env PYTHONPATH=$DALI_SITE:$PYTHONPATH \
  "$PY" benchmarks/loader.py --images 200 --workers 4 --batch-size 32 --repeats 2 --out "$RES"
# issue 12's model-step target: the code before issue 12 profiled exactly like profile-autocast
# (own data and run roots, so neither tree reads the other's shards); run both in one call
if want profile-autocast-base; then
  [ -d /tmp/base/sst_dist ] || { mkdir -p /tmp/base && tar xzf build/base-src.tgz -C /tmp/base; } \
    && step profile-autocast-base 100 env PYTHONPATH=/tmp/base${PYTHONPATH#$PWD} \
      SST_DATA_ROOT=$RES/base-data SST_OUTPUT_ROOT=$RES/base-runs bash -c "cd /tmp/base && \
      $PY -m sst_dist.cli profile ${PROFILE[*]} train.precision=bf16-autocast \
      output.name=profile-autocast-base --out $RES/profile-autocast-base --steps 8 --profile-steps 2" \
    || result[profile-autocast-base]="rc=2 (no build/base-src.tgz carried)"
fi
# the same step under the three precision recipes, side by side
for variant in profile:bf16 profile-autocast:bf16-autocast profile-fp32:fp32; do
  name=${variant%%:*}
  want "$name" && step "$name" 80 "$PY" -m sst_dist.cli profile "${PROFILE[@]}" \
    "train.precision=${variant#*:}" output.name="$name" --out "$RES/$name" --steps 8 --profile-steps 2
done

echo "== summary ($card, $day)" | tee "$RES/summary.txt"
status=0
for name in $STEPS; do
  echo "$name: ${result[$name]:-not run}" | tee -a "$RES/summary.txt"
  [[ ${result[$name]:-} == rc=0* ]] || status=1
done
tar czf "$DEST/gpu-results.tgz" -C "$RES" --exclude=checkpoints --exclude='*.pt' \
  --exclude=data --exclude=tensorboard --exclude='trace-*.json' --exclude=gpu-profile . && ls -la "$DEST/gpu-results.tgz"
exit $status
