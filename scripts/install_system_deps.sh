#!/usr/bin/env bash
# Install the system tools the launch tests need: slurm-wlm + munge (the SLURM test clusters),
# openssh-server + openssh-client + pdsh (the DeepSpeed launcher's ssh fan-out between the
# multi-host tests' network-namespace hosts), iproute2 (those namespaces).
# Idempotent and quiet: does nothing when the tools are already there. Needs root (or sudo) and
# Debian/Ubuntu apt; elsewhere it says what to install by hand.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/install_system_deps.sh [--check] [--help]

Installs the Debian packages slurm-wlm and munge (slurmctld, slurmd, sbatch, srun, sacct,
munged), openssh-server, openssh-client and pdsh (sshd, ssh, pdsh) and iproute2 (ip) with
apt-get when they are missing. Runs `apt-get update` first. Quiet on success. Only the tests
need them (`make test`); `make demo` does not.

  --check   only report what is missing; exit 1 if anything is
  --help    show this message
EOF
}

check_only=0
for arg in "$@"; do
  case "$arg" in
    --check) check_only=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install_system_deps.sh: unknown argument '$arg'" >&2; usage >&2; exit 2 ;;
  esac
done

# tool -> Debian package that provides it
declare -A PKG_OF=(
  [slurmctld]=slurm-wlm [slurmd]=slurm-wlm [sbatch]=slurm-wlm [srun]=slurm-wlm
  [sinfo]=slurm-wlm [sacct]=slurm-wlm [scontrol]=slurm-wlm
  [munged]=munge [munge]=munge
  [sshd]=openssh-server [ssh]=openssh-client [ssh-keygen]=openssh-client [pdsh]=pdsh
  [ip]=iproute2
)

missing_pkgs=()
for tool in "${!PKG_OF[@]}"; do
  # daemons live in /usr/sbin, which may be off PATH for non-root shells
  if ! command -v "$tool" >/dev/null 2>&1 && [[ ! -x "/usr/sbin/$tool" ]]; then
    pkg="${PKG_OF[$tool]}"
    [[ " ${missing_pkgs[*]-} " == *" $pkg "* ]] || missing_pkgs+=("$pkg")
  fi
done

if [[ ${#missing_pkgs[@]} -eq 0 ]]; then
  exit 0
fi
if [[ $check_only -eq 1 ]]; then
  echo "missing packages: ${missing_pkgs[*]}" >&2
  exit 1
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "install_system_deps.sh: need root to install ${missing_pkgs[*]}; run as root or" \
         "install them by hand (apt-get install ${missing_pkgs[*]})" >&2
    exit 1
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_system_deps.sh: apt-get not found; install ${missing_pkgs[*]} with your" \
       "system's package manager" >&2
  exit 1
fi

log=$(mktemp -t install_system_deps.XXXXXX.log)
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq && \
       $SUDO apt-get install -y -qq --no-install-recommends "${missing_pkgs[@]}"; } >"$log" 2>&1; then
  echo "install_system_deps.sh: apt-get failed installing ${missing_pkgs[*]}; its output:" >&2
  tail -n 30 "$log" >&2
  exit 1
fi
echo "installed: ${missing_pkgs[*]}"
