#!/usr/bin/env bash
# System packages the test suite needs beyond the Python ones: a single-node SLURM cluster
# (Debian's slurm-wlm + munge) for the real-SLURM launcher test (tests/slurm_cluster.py).
# Idempotent: does nothing when the binaries are already there. Called by .ci/run.
# Exits non-zero if they cannot be installed, unless HM_ALLOW_MISSING_SLURM=1 (then the SLURM
# test skips, saying why).
set -euo pipefail

need=(slurmctld slurmd munged sbatch srun squeue scancel sinfo scontrol)
missing=()
for bin in "${need[@]}"; do
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing+=("$bin")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install_test_deps: slurm-wlm and munge already installed"
  exit 0
fi
echo "install_test_deps: missing ${missing[*]}: installing slurm-wlm and munge"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install_test_deps: not root and no sudo; cannot install slurm-wlm/munge" >&2
    [ "${HM_ALLOW_MISSING_SLURM:-0}" = "1" ] && exit 0 || exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
# The packages' service scripts cannot start daemons in a container without an init system;
# the tests start their own daemons, so a failed service start is not an install failure.
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge; }; then
  echo "install_test_deps: apt-get install slurm-wlm munge failed" >&2
  [ "${HM_ALLOW_MISSING_SLURM:-0}" = "1" ] && exit 0 || exit 1
fi
echo "install_test_deps: installed $(sbatch --version 2>/dev/null || echo slurm-wlm)"
