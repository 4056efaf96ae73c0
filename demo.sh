#!/usr/bin/env bash
# The main job: install, then train -> evaluate -> plot -> compress/decompress on Fashion-MNIST (Debian's
# dataset-fashion-mnist, installed locally; nothing is downloaded at run time). Extra arguments go to
# `vaestream demo` (e.g. --epochs 2 --out runs/quick).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=2
exec vaestream demo "$@"
