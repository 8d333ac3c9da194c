#!/usr/bin/env bash
# Make sure Fashion-MNIST's four IDX files are where kdflow looks by default
# (/usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist package), or in $KDFLOW_FASHION_MNIST.
set -euo pipefail
dir=${KDFLOW_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
have() { [ -e "$dir/$1.gz" ] || [ -e "$dir/$1" ]; }
if have train-images-idx3-ubyte && have train-labels-idx1-ubyte && have t10k-images-idx3-ubyte && have t10k-labels-idx1-ubyte; then
  exit 0
fi
if [ -n "${KDFLOW_FASHION_MNIST:-}" ]; then
  echo "Fashion-MNIST: the IDX files are not in KDFLOW_FASHION_MNIST=$dir" >&2
  exit 1
fi
if command -v apt-get >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "Fashion-MNIST: installing Debian's dataset-fashion-mnist package"
  $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  exit 0
fi
echo "Fashion-MNIST not found in $dir and apt-get is not available: download the four *-ubyte.gz files from" >&2
echo "https://github.com/zalandoresearch/fashion-mnist into a folder and set KDFLOW_FASHION_MNIST to it." >&2
exit 1
