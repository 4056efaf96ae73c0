#!/usr/bin/env bash
# Installs everything vaestream needs on a fresh machine: the Python package (with test extras) and the default
# data set, Fashion-MNIST, from Debian's package dataset-fashion-mnist:
#   as root:    apt-get install dataset-fashion-mnist  -> /usr/share/datasets/fashion-mnist/
#   as a user:  apt-get download + dpkg-deb -x         -> $VAESTREAM_DATA/fashion-mnist/, by default
#               ${XDG_DATA_HOME:-~/.local/share}/vaestream/fashion-mnist/ (no root needed; run it in a venv)
# vaestream looks in $VAESTREAM_DATA/fashion-mnist, then /usr/share/datasets/fashion-mnist, then the user
# directory (vaestream.data.fashion_mnist_dirs). Nothing is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
SYSTEM_DIR=/usr/share/datasets/fashion-mnist
USER_DIR="${VAESTREAM_DATA:-${XDG_DATA_HOME:-$HOME/.local/share}/vaestream}/fashion-mnist"
have() { [ -f "$1/train-images-idx3-ubyte.gz" ] && [ -f "$1/t10k-images-idx3-ubyte.gz" ]; }

user_install() {  # unpack the Debian package into $USER_DIR without root
  local tmp rc=0
  tmp="$(mktemp -d)"
  (cd "$tmp" && apt-get download -q dataset-fashion-mnist >/dev/null \
    && dpkg-deb -x dataset-fashion-mnist_*.deb root \
    && mkdir -p "$USER_DIR" && cp "root$SYSTEM_DIR"/*-ubyte.gz "$USER_DIR/") || rc=1
  rm -rf "$tmp"
  [ $rc = 0 ] && echo "setup: Fashion-MNIST unpacked into $USER_DIR" >&2
  return $rc
}

if ! have "$SYSTEM_DIR" && ! have "$USER_DIR"; then
  if ! command -v apt-get >/dev/null; then
    echo "setup: Fashion-MNIST missing and no apt-get: put the four *-ubyte.gz files in $USER_DIR" >&2
  elif [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
      || echo "setup: could not install dataset-fashion-mnist; tests that need it will skip" >&2
  else
    user_install || echo "setup: could not download dataset-fashion-mnist (apt-get download); put the four" \
      "*-ubyte.gz files in $USER_DIR; tests that need them will skip" >&2
  fi
fi
if ! command -v curl >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl) || true   # README's REST calls
fi
# the broker source's tests and README example start a local redis-server (Debian's redis-server, 7.0)
if ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) \
      || echo "setup: could not install redis-server; the broker tests (tests/test_broker.py) will skip" >&2
  else
    echo "setup: redis-server missing (as root: apt-get install redis-server); the broker tests will skip" >&2
  fi
fi
python -m pip install -q --disable-pip-version-check -e '.[test]'
