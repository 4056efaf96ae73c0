#!/usr/bin/env bash
# Installs everything vaestream needs on a fresh machine: the Python package (with test extras) and,
# where we may (root, Debian), the default data set Fashion-MNIST from Debian's dataset-fashion-mnist.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
      || echo "setup: could not install dataset-fashion-mnist; tests that need it will skip" >&2
  else
    echo "setup: Fashion-MNIST missing; as root: apt-get install dataset-fashion-mnist" >&2
  fi
fi
python -m pip install -q --disable-pip-version-check -e '.[test]'
