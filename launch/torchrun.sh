#!/usr/bin/env bash
# Train SST with torchrun on one or several nodes: run this script once per node, all with the
# same NNODES / MASTER_ADDR / MASTER_PORT. Everything after CONFIG goes unchanged to
# `python -m sst_dist.cli train CONFIG ...` on every rank.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/torchrun.sh [OPTIONS] CONFIG [key=value ...] [--resume]
       launch/torchrun.sh [OPTIONS] --probe OUT_DIR

Run once on every node. Arguments after CONFIG are passed through unchanged.

Options (each also read from the environment variable in brackets):
  --nnodes N           number of nodes [NNODES] (1)
  --node-rank R        this node's rank, 0..N-1 [NODE_RANK] (0); used by the static
                       rendezvous (c10d assigns ranks by arrival order)
  --nproc-per-node P   ranks on this node [NPROC_PER_NODE]; default: number of GPUs,
                       or 1 with DS_ACCELERATOR=cpu / without GPUs
  --master-addr A      rendezvous host, reachable from every node [MASTER_ADDR] (127.0.0.1)
  --master-port P      rendezvous port [MASTER_PORT] (29500)
  --rdzv-backend B     c10d (elastic, default) or static [RDZV_BACKEND]
  --rdzv-id ID         job id shared by all nodes of one run [RDZV_ID] (sst-dist)
  --probe OUT_DIR      run launch/probe.py (all-reduce check) instead of training
  --dry-run            print the command instead of running it
  -h, --help           show this message

Environment: SST_ROOT (repository root; default: this script's parent), SST_VENV (virtualenv;
default $SST_ROOT/.venv, ignored when absent), DS_ACCELERATOR=cpu for CPU ranks (gloo).

Exit status: 2, with a message naming the problem, for a bad option, a missing CONFIG or an
unusable environment; otherwise the training's own (0 done, 2 bad config/arguments/checkpoint, 3
aborted after repeated non-finite losses, 75 preempted: rerun with --resume).

Example, two nodes:
  node0$ NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh launch/configs/coco2014.yaml
  node1$ NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh launch/configs/coco2014.yaml
EOF
}

die() { echo "torchrun.sh: $*" >&2; echo "Run 'launch/torchrun.sh --help' for usage." >&2; exit 2; }

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SST_ROOT=${SST_ROOT:-$(dirname "$SCRIPT_DIR")}
SST_VENV=${SST_VENV:-$SST_ROOT/.venv}
# shellcheck source=launch/common.sh
source "$SCRIPT_DIR/common.sh"

nnodes=${NNODES:-1}
node_rank=${NODE_RANK:-0}
nproc=${NPROC_PER_NODE:-}
master_addr=${MASTER_ADDR:-127.0.0.1}
master_port=${MASTER_PORT:-29500}
rdzv_backend=${RDZV_BACKEND:-c10d}
rdzv_id=${RDZV_ID:-sst-dist}
probe_dir=""
dry_run=0

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --nnodes) [[ $# -ge 2 ]] || die "$1 needs a value"; nnodes=$2; shift 2 ;;
    --node-rank|--node_rank) [[ $# -ge 2 ]] || die "$1 needs a value"; node_rank=$2; shift 2 ;;
    --nproc-per-node|--nproc_per_node) [[ $# -ge 2 ]] || die "$1 needs a value"; nproc=$2; shift 2 ;;
    --master-addr|--master_addr) [[ $# -ge 2 ]] || die "$1 needs a value"; master_addr=$2; shift 2 ;;
    --master-port|--master_port) [[ $# -ge 2 ]] || die "$1 needs a value"; master_port=$2; shift 2 ;;
    --rdzv-backend|--rdzv_backend) [[ $# -ge 2 ]] || die "$1 needs a value"; rdzv_backend=$2; shift 2 ;;
    --rdzv-id|--rdzv_id) [[ $# -ge 2 ]] || die "$1 needs a value"; rdzv_id=$2; shift 2 ;;
    --probe) [[ $# -ge 2 ]] || die "$1 needs a value"; probe_dir=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -*) die "unknown option '$1' (options go before CONFIG)" ;;
    *) break ;;
  esac
done

is_int "$nnodes" && [[ "$nnodes" -ge 1 ]] || die "NNODES must be a positive integer, got '$nnodes'"
is_int "$node_rank" && [[ "$node_rank" -lt "$nnodes" ]] \
  || die "NODE_RANK must be an integer in [0, $nnodes), got '$node_rank'"
is_port "$master_port" || die "MASTER_PORT must be a port number (1-65535), got '$master_port'"
case "$rdzv_backend" in c10d|static) ;; *) die "RDZV_BACKEND must be c10d or static, got '$rdzv_backend'" ;; esac

find_python

if [[ -z "$nproc" ]]; then
  if [[ "${DS_ACCELERATOR:-}" == "cpu" ]]; then
    nproc=1
  else
    nproc=$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))")
  fi
fi
is_int "$nproc" && [[ "$nproc" -ge 1 ]] || die "NPROC_PER_NODE must be a positive integer, got '$nproc'"

set_entry "$probe_dir" "$@"
if [[ $ENTRY_IS_MODULE == 1 ]]; then entry=(-m "${entry[@]}"); fi

tr_args=(--nnodes "$nnodes" --nproc_per_node "$nproc")
if [[ "$rdzv_backend" == c10d ]]; then
  tr_args+=(--rdzv_backend c10d --rdzv_endpoint "$master_addr:$master_port" --rdzv_id "$rdzv_id")
else
  tr_args+=(--node_rank "$node_rank" --master_addr "$master_addr" --master_port "$master_port")
fi

# `python -m torch.distributed.run` is torchrun without relying on the console script.
cmd=("$PYTHON" -m torch.distributed.run "${tr_args[@]}" "${entry[@]}")
echo "+ ${cmd[*]}" >&2
if [[ $dry_run -eq 1 ]]; then
  exit 0
fi
exec "${cmd[@]}"
