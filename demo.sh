#!/usr/bin/env bash
# The main job: install, then train -> evaluate -> plot -> compress/decompress -> export on Fashion-MNIST
# (Debian's dataset-fashion-mnist: scripts/setup.sh installs it as root, or unpacks it into a user directory
# without root; nothing is downloaded at run time). Extra arguments go to `vaestream demo` (e.g. --epochs 1).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=2
exec vaestream demo "$@"
