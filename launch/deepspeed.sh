#!/usr/bin/env bash
# Train SST with the `deepspeed` launcher, on one node or on the nodes of a hostfile.
# Everything after CONFIG (key=value overrides, --resume) goes unchanged to
# `python -m sst_dist.cli train CONFIG ...` on every rank.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/deepspeed.sh [OPTIONS] CONFIG [key=value ...] [--resume]
       launch/deepspeed.sh [OPTIONS] --probe OUT_DIR

Starts `python -m sst_dist.cli train CONFIG ...` on every rank with the deepspeed launcher.
Arguments after CONFIG are passed through unchanged (overrides such as train.epochs=2, --resume).

Options (each also read from the environment variable in brackets):
  --num-gpus N       ranks per node [NUM_GPUS]; default: the hostfile's slots, else every
                     visible GPU, or 2 CPU ranks with DS_ACCELERATOR=cpu
  --hostfile FILE    multi-node hostfile, lines "hostname slots=N" [HOSTFILE]; default: this node
  --num-nodes N      use the first N hosts of the hostfile [NUM_NODES]
  --launcher NAME    multi-node backend: pdsh, openmpi, mvapich, mpich, impi, slurm [DS_LAUNCHER] (pdsh)
  --no-ssh           multi-node without ssh: run this script once on every node with
                     --node-rank [DS_NO_SSH=1]
  --node-rank R      this node's rank with --no-ssh [NODE_RANK]
  --master-addr A    rendezvous host [MASTER_ADDR]; default 127.0.0.1 on one node,
                     the first hostfile host otherwise
  --master-port P    rendezvous port [MASTER_PORT] (29500)
  --probe OUT_DIR    run launch/probe.py (all-reduce check) instead of training
  --dry-run          print the command instead of running it
  -h, --help         show this message

Environment: SST_ROOT (repository root; default: this script's parent), SST_VENV (virtualenv;
default $SST_ROOT/.venv, ignored when absent), DS_ACCELERATOR=cpu for CPU ranks (gloo).
With a hostfile and ssh the remote ranks get DS_ACCELERATOR, OMP_NUM_THREADS,
CUDA_VISIBLE_DEVICES, every SST_* variable, DeepSpeed's own (PYTHON*, NCCL*, ...) and the lines
of your .deepspeed_env ($DS_ENV_FILE, else ~/.deepspeed_env and ./.deepspeed_env).
On several nodes the repository and the run's output directory must be on shared storage, and
the network must be trusted (README, Trust model). With a hostfile and ssh, a shell on every node
parses the command again: arguments, forwarded variables and the working directory may then only
hold letters, digits and _ . / : = , + @ - (anything else is refused, exit status 2).

Exit status: 2, with a message naming the problem, for a bad option, a missing CONFIG or an
unusable environment; otherwise the training's own (0 done, 2 bad config/arguments/checkpoint, 3
aborted after repeated non-finite losses, 75 preempted: rerun with --resume).

Examples:
  DS_ACCELERATOR=cpu launch/deepspeed.sh --num-gpus 2 launch/configs/debug.yaml
  launch/deepspeed.sh --hostfile hostfile launch/configs/coco2014.yaml train.epochs=20 --resume
EOF
}

die() { echo "deepspeed.sh: $*" >&2; echo "Run 'launch/deepspeed.sh --help' for usage." >&2; exit 2; }

# append_env_file USER_FILE OUT: copy the KEY=VALUE lines of a .deepspeed_env into OUT, refusing
# (exit 2, naming file and line) what DeepSpeed would split wrongly or a remote shell re-parse.
append_env_file() {
  local src=$1 out=$2 n=0 line key
  while IFS= read -r line || [[ -n "$line" ]]; do
    n=$((n + 1))
    [[ -n "${line//[[:space:]]/}" && "$line" != \#* ]] || continue
    [[ "$line" == *=* ]] || die "$src:$n: expected KEY=VALUE, got $(printf '%q' "$line")"
    key=${line%%=*}
    [[ "$key" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "$src:$n: '$key' is not a variable name"
    remote_shell_safe "$src:$n: the value of $key" "${line#*=}"
    echo "$line" >>"$out"
  done <"$src"
}

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SST_ROOT=${SST_ROOT:-$(dirname "$SCRIPT_DIR")}
SST_VENV=${SST_VENV:-$SST_ROOT/.venv}
# shellcheck source=launch/common.sh
source "$SCRIPT_DIR/common.sh"

num_gpus=${NUM_GPUS:-}
hostfile=${HOSTFILE:-}
num_nodes=${NUM_NODES:-}
launcher=${DS_LAUNCHER:-pdsh}
no_ssh=${DS_NO_SSH:-0}
node_rank=${NODE_RANK:-}
master_addr=${MASTER_ADDR:-}
master_port=${MASTER_PORT:-29500}
probe_dir=""
dry_run=0

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --num-gpus|--num_gpus) [[ $# -ge 2 ]] || die "$1 needs a value"; num_gpus=$2; shift 2 ;;
    --hostfile) [[ $# -ge 2 ]] || die "$1 needs a value"; hostfile=$2; shift 2 ;;
    --num-nodes|--num_nodes) [[ $# -ge 2 ]] || die "$1 needs a value"; num_nodes=$2; shift 2 ;;
    --launcher) [[ $# -ge 2 ]] || die "$1 needs a value"; launcher=$2; shift 2 ;;
    --no-ssh|--no_ssh) no_ssh=1; shift ;;
    --node-rank|--node_rank) [[ $# -ge 2 ]] || die "$1 needs a value"; node_rank=$2; shift 2 ;;
    --master-addr|--master_addr) [[ $# -ge 2 ]] || die "$1 needs a value"; master_addr=$2; shift 2 ;;
    --master-port|--master_port) [[ $# -ge 2 ]] || die "$1 needs a value"; master_port=$2; shift 2 ;;
    --probe) [[ $# -ge 2 ]] || die "$1 needs a value"; probe_dir=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -*) die "unknown option '$1' (options go before CONFIG)" ;;
    *) break ;;
  esac
done

[[ -z "$num_gpus" ]] || is_pos_int "$num_gpus" || die "--num-gpus must be a positive integer, got '$num_gpus'"
[[ -z "$num_nodes" ]] || is_pos_int "$num_nodes" || die "--num-nodes must be a positive integer, got '$num_nodes'"
is_port "$master_port" || die "--master-port must be a port number (1-65535), got '$master_port'"
case "$launcher" in
  pdsh|openmpi|mvapich|mpich|impi|slurm) ;;
  *) die "--launcher must be one of pdsh, openmpi, mvapich, mpich, impi, slurm; got '$launcher'" ;;
esac
[[ "$no_ssh" != 1 || -n "$hostfile" ]] || die "--no-ssh (DS_NO_SSH=1) is a multi-node mode: it needs --hostfile"
[[ -z "$hostfile" || -f "$hostfile" ]] || die "hostfile '$hostfile' does not exist"

find_python
"$PYTHON" -c "import importlib.util as u, sys; sys.exit(u.find_spec('deepspeed') is None)" \
  || die "deepspeed is not installed for $PYTHON (set SST_VENV)"
if [[ -x "$SST_VENV/bin/deepspeed" ]]; then
  DEEPSPEED="$SST_VENV/bin/deepspeed"
else
  DEEPSPEED=$(command -v deepspeed) || die "the deepspeed launcher is not on PATH (set SST_VENV)"
fi

set_entry "$probe_dir" "$@"
if [[ -n "$hostfile" && "$no_ssh" != 1 ]]; then
  # pdsh/ssh fan-out: the remote shell parses the command line again (remote_shell_safe)
  for arg in "${entry[@]}"; do remote_shell_safe "argument" "$arg"; done
  remote_shell_safe "the working directory" "$PWD"
  remote_shell_safe "the python path" "$PYTHON"
fi
module_flag=()
if [[ $ENTRY_IS_MODULE == 1 ]]; then module_flag=(--module); fi

if [[ -z "$num_gpus" && -z "$hostfile" && "${DS_ACCELERATOR:-}" == "cpu" ]]; then
  num_gpus=2
fi

ds_args=(--master_port "$master_port" --no_local_rank)
if [[ -n "$num_gpus" ]]; then ds_args+=(--num_gpus "$num_gpus"); fi
if [[ -n "$hostfile" ]]; then
  ds_args+=(--hostfile "$hostfile" --launcher "$launcher")
  if [[ -n "$num_nodes" ]]; then ds_args+=(--num_nodes "$num_nodes"); fi
  if [[ -n "$master_addr" ]]; then ds_args+=(--master_addr "$master_addr"); fi
  if [[ "$no_ssh" == 1 ]]; then
    [[ -n "$node_rank" ]] || die "--no-ssh needs --node-rank (or NODE_RANK)"
    [[ -n "$master_addr" ]] || die "--no-ssh needs --master-addr (or MASTER_ADDR)"
    ds_args+=(--no_ssh --node_rank "$node_rank")
  else
    # Remote ranks get only PYTHON*-prefixed variables and DeepSpeed's env file; hand over the
    # ones we rely on (every SST_* variable the code reads, e.g. SST_LOG_RANK) and then the
    # user's own .deepspeed_env lines (read where DeepSpeed reads them), which win as in DeepSpeed.
    env_file=$(mktemp -t sst_ds_env.XXXXXX)
    trap 'rm -f "$env_file"' EXIT
    for var in DS_ACCELERATOR OMP_NUM_THREADS CUDA_VISIBLE_DEVICES $(compgen -e | grep -E '^SST_' || true); do
      if [[ -n "${!var:-}" ]]; then
        remote_shell_safe "environment variable $var" "${!var}"
        echo "$var=${!var}" >>"$env_file"
      fi
    done
    user_env_name=${DS_ENV_FILE:-.deepspeed_env}
    for dir in ${HOME:+"$HOME"} "$PWD"; do
      user_env=$user_env_name
      [[ "$user_env" == /* ]] || user_env="$dir/$user_env"
      [[ -f "$user_env" ]] || continue
      append_env_file "$user_env" "$env_file"
      [[ "$user_env_name" != /* ]] || break  # an absolute DS_ENV_FILE is one file, read once
    done
    # DeepSpeed also exports every variable whose name starts with one of these, unquoted
    while IFS= read -r var; do
      remote_shell_safe "environment variable $var" "${!var}"
    done < <(compgen -e | grep -E '^(PYTHON|MLFLOW|MV2|UCX|NCCL)' || true)
    export DS_ENV_FILE="$env_file"  # absolute: os.path.join(home, abs) keeps it as is
  fi
else
  [[ -z "$num_nodes" || "$num_nodes" == 1 ]] || die "--num-nodes $num_nodes needs --hostfile"
  if [[ -n "$master_addr" ]]; then ds_args+=(--master_addr "$master_addr"); fi
fi

cmd=("$DEEPSPEED" "${ds_args[@]}" "${module_flag[@]}" "${entry[@]}")
echo "+ ${cmd[*]}" >&2
if [[ $dry_run -eq 1 ]]; then
  exit 0
fi
# `exec` would drop the EXIT trap that removes the env file; run as a child instead.
"${cmd[@]}"
