#!/usr/bin/env bash
# One-command set-up on a fresh Debian 12 / Python 3.11 machine (as root, or with sudo):
# the Debian packages that provide the embedded data and the local SLURM test cluster, then the
# Python package with its pinned dependencies. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then SUDO="sudo"; else
    echo "install.sh: the Debian packages need root (or sudo): run as root" >&2; exit 1; fi
fi

# Embedded data (see docs/DATA.md): Fashion-MNIST, speech synthesisers, text corpora, real speech prompts.
DATA_PKGS="dataset-fashion-mnist espeak-ng flite bible-kjv wordnet-base asterisk-core-sounds-en-wav asterisk-core-sounds-en"
# A real one-node SLURM cluster for the workflow tests (tests/slurm/cluster.sh).
SLURM_PKGS="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
# The C++ compiler torch.compile's CPU backend builds its kernels with (compile: blocks / model; tests/test_flops.py).
BUILD_PKGS="g++"

missing=""
for p in $DATA_PKGS $SLURM_PKGS $BUILD_PKGS; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi

python3 -m pip install -q -e ".[test]"
echo "install.sh: done"
