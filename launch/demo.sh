#!/usr/bin/env bash
# The whole SST-Dist story on one CPU machine, no downloads: synthetic multi-label scenes ->
# WebDataset shards -> 2-rank DeepSpeed training (CPU, gloo) of the demo config -> evaluation
# of the best checkpoint -> metrics table, plots and logs.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/demo.sh [OPTIONS] [-- key=value ...]

Steps: 1. `sst-dist shards synthetic` writes train/test shards (sizes from the config's
data.synthetic section); 2. launch/deepspeed.sh trains the config with 2 CPU ranks
(DS_ACCELERATOR=cpu); 3. `sst-dist eval` evaluates the best checkpoint; 4. prints the metrics
table and where the plots, logs and checkpoints are. Overrides after `--` go to training.

Options:
  --out DIR        where data and runs go [DEMO_DIR] (default: $SST_ROOT/runs/demo)
  --config FILE    run config (default: launch/configs/demo.yaml)
  --ranks N        CPU ranks (default 2)
  --port P         rendezvous port [MASTER_PORT] (default 29517)
  --fresh          regenerate the shards and start the run from scratch
  -h, --help       show this message

Every argument (the config and the overrides included) is checked before any work. Shards in
DIR/data are reused when both splits are there and were made with the config's settings; the
demo never replaces data it did not make: anything else there (a lone split, other files) is
refused, as are shards of other settings (exit 2, one line): --fresh deletes DIR/data and
DIR/train and starts over. The evaluation's AP files go to DIR/train/eval beside training's
own, and each evaluation is appended to DIR/train/eval.log.
Exit status: 0 done; 2 bad arguments or data the demo will not reuse; otherwise that of the
failed step.

Environment: SST_ROOT (repository root; default this script's parent), SST_VENV (virtualenv,
default $SST_ROOT/.venv). The first DeepSpeed start builds a CPU comm op (~2 min, cached).
EOF
}

die() { echo "demo.sh: $*" >&2; echo "Run 'launch/demo.sh --help' for usage." >&2; exit 2; }

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export SST_ROOT=${SST_ROOT:-$(dirname "$SCRIPT_DIR")}
export SST_VENV=${SST_VENV:-$SST_ROOT/.venv}

out=${DEMO_DIR:-$SST_ROOT/runs/demo}
config=$SST_ROOT/launch/configs/demo.yaml
ranks=2
port=${MASTER_PORT:-29517}
fresh=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out) [[ $# -ge 2 ]] || die "$1 needs a value"; out=$2; shift 2 ;;
    --config) [[ $# -ge 2 ]] || die "$1 needs a value"; config=$2; shift 2 ;;
    --ranks) [[ $# -ge 2 ]] || die "$1 needs a value"; ranks=$2; shift 2 ;;
    --port) [[ $# -ge 2 ]] || die "$1 needs a value"; port=$2; shift 2 ;;
    --fresh) fresh=1; shift ;;
    --) shift; break ;;
    *) die "unknown argument '$1' (training overrides go after --)" ;;
  esac
done
overrides=("$@")
refuse() { echo "demo.sh: $*" >&2; exit 2; }  # data the demo did not make: one line, nothing touched

# shellcheck source=launch/common.sh
source "$SST_ROOT/launch/common.sh"
# every argument is checked before any work (nothing is created or generated until they pass)
is_pos_int "$ranks" || die "--ranks must be a positive integer, got '$ranks'"
is_port "$port" || die "--port must be a port number (1-65535), got '$port'"
[[ -f "$config" ]] || die "config file '$config' does not exist"
[[ -n "$out" ]] || die "--out must not be empty"
[[ ! -e "$out" || -d "$out" ]] || die "--out '$out' exists and is not a directory"
find_python
export DS_ACCELERATOR=cpu
sst() { "$PYTHON" -m sst_dist.cli "$@"; }
out=$("$PYTHON" -c 'import os, sys; print(os.path.abspath(sys.argv[1]))' "$out")  # absolute, not created yet

data_dir=$out/data
run_root=$out
run_name=train
run_dir=$run_root/$run_name
run_overrides=("data.root=$data_dir" "data.synthetic.enabled=false" "output.root=$run_root"
               "output.name=$run_name" "${overrides[@]}")
step() { printf '\n==> %s\n' "$*"; }

# the config and the user's overrides (sizes of the synthetic scenes among them), checked now
settings=$("$PYTHON" - "$config" "${run_overrides[@]}" <<'PY'
import sys
from sst_dist.config import ConfigError, load_config
try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
except (ConfigError, OSError, ValueError) as e:
    print(f"demo.sh: {e}", file=sys.stderr)
    sys.exit(2)
s = cfg.data.synthetic
print(cfg.model.num_classes, s.num_train, s.num_test, s.image_size, s.seed, s.difficulty)
PY
) || exit 2
read -r n_classes n_train n_test img seed difficulty <<<"$settings"

mkdir -p "$out"

# 1. synthetic scenes -> shards, sized by the config (and the user's overrides).
step "1/4 synthetic scenes -> shards in $data_dir"
if [[ $fresh -eq 1 ]]; then
  rm -rf "$data_dir" "$run_dir"
fi
has_split() { compgen -G "$data_dir/*-$1-_info.json" >/dev/null; }
if has_split train && has_split test; then
  # shards made with other settings (an older demo's easy scenes) are refused, not reused
  "$PYTHON" - "$data_dir" "$n_train" "$n_test" "$n_classes" "$img" "$seed" "$difficulty" <<'PY'
import sys
from data_shards.synthetic import check_params, generation_params
root, *v = sys.argv[1:]
try:
    check_params(root, generation_params(*map(int, v[:5]), min(4, int(v[2])), v[5]))
except ValueError as e:
    print(f"demo.sh: {e}; or use --fresh", file=sys.stderr)
    sys.exit(2)
PY
  echo "shards already in $data_dir (use --fresh to regenerate)"
elif [[ -e "$data_dir" || -L "$data_dir" ]] && [[ ! -d "$data_dir" || -n "$(ls -A "$data_dir")" ]]; then
  # a lone split, raw scenes or someone's files: the demo replaces only data it makes itself
  what="no train and test shards"
  has_split train && what="a train split but no test split"
  has_split test && what="a test split but no train split"
  refuse "$data_dir holds $what; nothing was changed: use --fresh to regenerate it (deletes $data_dir and $run_dir)"
else
  sst shards synthetic --out "$data_dir" --n-train "$n_train" --n-test "$n_test" --num-classes "$n_classes" \
    --image-size "$img" --seed "$seed" --difficulty "$difficulty" --no-progress
fi

# 2. training: 2 CPU ranks under the deepspeed launcher.
step "2/4 training $config with $ranks CPU ranks (deepspeed launcher)"
resume=()
if [[ -f "$run_dir/checkpoints/latest" ]]; then
  resume=(--resume)
  echo "continuing the run in $run_dir (use --fresh to start over)"
elif [[ -e "$run_dir/config.yaml" || -e "$run_dir/metrics.jsonl" ]]; then
  resume=(--resume)  # a run stopped before its first checkpoint: --resume starts it again in place
  echo "restarting the run in $run_dir, which stopped before its first checkpoint"
fi
"$SCRIPT_DIR/deepspeed.sh" --num-gpus "$ranks" --master-port "$port" "$config" "${run_overrides[@]}" \
  "${resume[@]}"

# 3. evaluation of the best checkpoint (the latest when no best is recorded) on the test split.
step "3/4 evaluating the best checkpoint"
ckpt=$run_dir
if [[ -f "$run_dir/checkpoints/best" ]]; then
  best=$run_dir/checkpoints/$(head -n 1 "$run_dir/checkpoints/best")
  [[ -d "$best" ]] && ckpt=$best
fi
# beside training's own evaluations (ap_<run>_<checkpoint>_test.*): the demo's evaluation of its
# own run, so a rerun may replace it (same checkpoint, same result); eval.log keeps every one
eval_dir=$run_dir/eval
eval_log=$run_dir/eval.log
echo "# evaluation of $ckpt, $(date -u +%Y-%m-%dT%H:%M:%SZ)" >>"$eval_log"
sst eval "$ckpt" --out "$eval_dir" --overwrite 2>&1 | tee -a "$eval_log"

# 4. where everything is.
step "4/4 results"
"$PYTHON" - "$run_dir" "$eval_dir" <<'PY'
import json
import sys
from pathlib import Path

import yaml

from sst_dist.metrics import format_table

run, eval_dir = Path(sys.argv[1]), Path(sys.argv[2]).name
records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
evals = [r for r in records if r.get("kind") == "eval"]
epochs = [r for r in records if r.get("kind") == "epoch"]
if epochs:
    print("training loss by epoch: " + ", ".join(f"{r['epoch']}: {r['loss']:.4f}" for r in epochs))
if evals:
    print("test mAP after each evaluation: " + ", ".join(f"{100 * r['mAP']:.2f}" for r in evals))
if epochs:  # SST's pseudo labels: what each source added, checked against the hidden full labels
    print("\npseudo labels per epoch: new positives for unknown labels (precision vs the hidden full labels)")
    print(f"{'epoch':>5} {'margin':>6}  {'intra-image':>20}  {'cross-image (bank)':>20}")
    warmup = yaml.safe_load((run / "config.yaml").read_text())["pseudo"]["warmup_epochs"]
    for r in epochs:
        cells = [f"{r.get(k + '_count', 0):6.0f} ({100 * r[k + '_precision']:5.1f}% right)"
                 if r.get(k + "_count") else f"{'0':>6} {'':13}" for k in ("intra", "inter")]
        if r["epoch"] < warmup:
            cells = ["warm-up", "(no pseudo labels)"]
        print(f"{r['epoch']:>5} {r.get('margin_intra', float('nan')):6.3f}  {cells[0]:>20}  {cells[1]:>20}")
    if not any(r.get("intra_count") or r.get("inter_count") for r in epochs):
        print("no score reached its margin, so SST added no pseudo label (why: docs/accuracy.md)")
final = [json.loads(line) for line in (run / "eval.log").read_text().splitlines() if line.startswith("{")]
if final:
    print(f"\nmetrics of {final[-1]['checkpoint']} on the test split, in percent:")
    print(format_table(final[-1]))
print("\nfiles:")
for label, pattern in (("run directory", "."), ("training log", "train.log"), ("evaluation log", "eval.log"),
                       ("metrics (JSON lines)", "metrics.jsonl"), ("resolved config", "config.yaml"),
                       ("checkpoints", "checkpoints"), ("per-class AP plots", f"{eval_dir}/*.png"),
                       ("TensorBoard", "tensorboard")):
    hits = sorted(run.glob(pattern)) if pattern != "." else [run]
    if hits:
        shown = ", ".join(str(h) for h in hits[-3:]) + (f" (+{len(hits) - 3} more)" if len(hits) > 3 else "")
        print(f"  {label:22s} {shown}")
PY
