# Shared by the launch scripts (deepspeed.sh, torchrun.sh, demo.sh, slurm/train.sbatch): source
# it after defining die() and SST_ROOT / SST_VENV.

is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }
is_pos_int() { is_int "$1" && ((10#$1 >= 1)); }
is_port() { is_int "$1" && ((10#$1 >= 1 && 10#$1 <= 65535)); }

# PYTHON: the project's virtualenv when there is one, else whatever is on PATH; the repository
# goes on PYTHONPATH so every rank imports this checkout.
find_python() {
  if [[ -x "$SST_VENV/bin/python" ]]; then
    PYTHON="$SST_VENV/bin/python"
    # Append, not prepend, the venv's bin: its tools (ninja, deepspeed) are found, yet a system
    # ninja keeps winning when present. DeepSpeed JIT-builds its CPU comm op with the first ninja
    # on PATH and ninja 1.11 and 1.13 hash commands differently, so mixing them rebuilds the
    # shared op cache (~2 min).
    case ":$PATH:" in *":$SST_VENV/bin:"*) ;; *) export PATH="$PATH:$SST_VENV/bin" ;; esac
  else
    PYTHON=$(command -v python3 || command -v python) || die "no python found (set SST_VENV)"
  fi
  export PYTHONPATH="$SST_ROOT${PYTHONPATH:+:$PYTHONPATH}"
}

# entry: what every rank runs, as module-or-script arguments for a launcher. PROBE_DIR non-empty:
# launch/probe.py (all-reduce check); else `sst_dist.cli train CONFIG [overrides...]`.
# ENTRY_IS_MODULE tells whether entry[0] is a module name (launchers spell that -m or --module).
set_entry() {
  local probe_dir=$1; shift
  if [[ -n "$probe_dir" ]]; then
    [[ $# -eq 0 ]] || die "--probe takes no CONFIG or overrides (got: $*)"
    entry=("$SST_ROOT/launch/probe.py" --out "$probe_dir")
    ENTRY_IS_MODULE=0
  else
    [[ $# -ge 1 ]] || die "missing CONFIG (a run-config YAML, e.g. launch/configs/debug.yaml)"
    [[ -f "$1" ]] || die "config file '$1' does not exist (relative to $PWD)"
    entry=(sst_dist.cli train "$@")
    ENTRY_IS_MODULE=1
  fi
}

# remote_shell_safe WHAT VALUE: die unless VALUE survives being re-parsed by a remote shell
# unchanged. DeepSpeed's pdsh fan-out joins the command, the exported environment and the working
# directory into one string that a shell on every node parses again, unquoted: a `$(...)`, `;`,
# quote or space there would run (or split) on every node. Only these characters pass:
# letters, digits and _ . / : = , + @ -
remote_shell_safe() {
  local what=$1 value=$2
  if [[ ! "$value" =~ ^[A-Za-z0-9_./:=,+@-]*$ ]]; then
    die "$what contains characters a remote shell would re-parse (allowed: letters, digits, _ . / : = , + @ -); got: $(printf '%q' "$value")"
  fi
}
