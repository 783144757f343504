#!/usr/bin/env bash
# Carry DALI's wheel (nvidia-dali-cuda130, ~200+ MB) to the device machine, whose calls carry at most
# 64 MiB each but which keeps /tmp between calls while it stays warm (30 s after each call).
#   here:    scripts/device_wheel.sh split [WHEEL]   -> build/dali-wheel/{manifest,parts/NN} (<60 MiB each)
#   device:  scripts/device_wheel.sh receive NN      -> checks piece NN against the manifest, keeps it in
#                                                       $DALI_STAGE (default /tmp/dali-stage)
#   device:  scripts/device_wheel.sh install         -> joins the pieces, checks the wheel's sha256,
#                                                       installs it (--no-deps) into $DALI_SITE
# build/ is git-ignored, so each device call names its piece in `carry`; the call sequence is in
# docs/gpu-step.md ("A device session, step by step"). Bad input exits 2 with one line.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=build/dali-wheel
STAGE=${DALI_STAGE:-/tmp/dali-stage}
SITE=${DALI_SITE:-/tmp/site-dali}
PIECE_MIB=${PIECE_MIB:-55}
PY=${PYTHON:-python3}
die() { echo "device_wheel.sh: $*" >&2; exit 2; }

case "${1:-}" in
  split)
    wheel=${2:-}
    if [[ -z $wheel ]]; then
      mkdir -p "$DIR/download"
      version=$("$PY" -c "import importlib.metadata as m; print(m.version('nvidia-dali-cuda130'))" 2>/dev/null \
        || echo "")
      "$PY" -m pip download --no-deps --only-binary=:all: -d "$DIR/download" \
        "nvidia-dali-cuda130${version:+==$version}" >/dev/null
      wheel=$(ls "$DIR"/download/nvidia_dali_cuda130-*.whl | head -n 1)
    fi
    [[ -f $wheel && $wheel == *.whl ]] || die "no wheel file at '$wheel'"
    rm -rf "$DIR/parts" && mkdir -p "$DIR/parts"
    split -b "${PIECE_MIB}m" -d -a 2 "$wheel" "$DIR/parts/"
    { echo "wheel $(basename "$wheel") $(sha256sum "$wheel" | cut -d' ' -f1)"
      for p in "$DIR"/parts/*; do echo "piece $(basename "$p") $(sha256sum "$p" | cut -d' ' -f1)"; done
    } > "$DIR/manifest.tmp"
    mv "$DIR/manifest.tmp" "$DIR/manifest"  # last: device_prep.sh takes a manifest as a finished split
    n=$(ls "$DIR/parts" | wc -l)
    echo "split $(basename "$wheel") into $n pieces of <= ${PIECE_MIB} MiB under $DIR/parts"
    for p in "$DIR"/parts/*; do
      echo "  run: carry [$DIR/manifest, $p]  command: bash scripts/device_wheel.sh receive $(basename "$p")"
    done
    echo "  run: carry [$DIR/manifest]  command: bash scripts/device_wheel.sh install && bash benchmarks/gpu_checks.sh dali-decode"
    ;;
  receive)
    piece=${2:-}
    [[ $piece =~ ^[0-9]{2}$ ]] || die "receive needs a piece number like 00, got '${piece}'"
    [[ -f $DIR/manifest && -f $DIR/parts/$piece ]] || die "$DIR/manifest or $DIR/parts/$piece was not carried"
    want=$(awk -v p="$piece" '$1 == "piece" && $2 == p {print $3}' "$DIR/manifest")
    [[ -n $want ]] || die "piece $piece is not in $DIR/manifest"
    got=$(sha256sum "$DIR/parts/$piece" | cut -d' ' -f1)
    [[ $got == "$want" ]] || die "piece $piece: sha256 $got, manifest says $want"
    mkdir -p "$STAGE" && cp "$DIR/parts/$piece" "$STAGE/$piece" && cp "$DIR/manifest" "$STAGE/manifest"
    echo "piece $piece ok; staged: $(ls "$STAGE" | grep -c '^[0-9]') of $(grep -c '^piece' "$DIR/manifest")"
    ;;
  install)
    [[ -f $STAGE/manifest ]] || die "nothing staged in $STAGE (run receive for every piece first, while warm)"
    read -r _ name sha < <(grep '^wheel' "$STAGE/manifest")
    for p in $(awk '$1 == "piece" {print $2}' "$STAGE/manifest"); do
      [[ -f $STAGE/$p ]] || die "piece $p missing in $STAGE (the machine went cold? start the sequence again)"
    done
    cat $(awk -v s="$STAGE" '$1 == "piece" {print s "/" $2}' "$STAGE/manifest") > "$STAGE/$name"
    [[ $(sha256sum "$STAGE/$name" | cut -d' ' -f1) == "$sha" ]] || die "$name: joined wheel fails its sha256"
    "$PY" -m pip install -q --no-deps --no-index --target "$SITE" "$STAGE/$name"
    PYTHONPATH=$SITE "$PY" -c "import nvidia.dali as d; print('DALI', d.__version__, 'installed in $SITE')"
    ;;
  *)
    die "usage: device_wheel.sh split [WHEEL] | receive NN | install (got '${1:-}')"
    ;;
esac
