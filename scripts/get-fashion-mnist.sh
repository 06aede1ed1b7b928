#!/usr/bin/env bash
# Make sure Fashion-MNIST is on this machine: the Debian package dataset-fashion-mnist installs the
# gzip IDX files under /usr/share/datasets/fashion-mnist. Installs it where apt is available.
set -euo pipefail
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ] && [ -f "$dir/t10k-labels-idx1-ubyte.gz" ]; then
  echo "Fashion-MNIST: found in $dir"
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  echo "Fashion-MNIST: installing the Debian package dataset-fashion-mnist"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  echo "Fashion-MNIST: installed in $dir"
  exit 0
fi
cat >&2 <<MSG
Fashion-MNIST was not found in $dir and apt-get is not available.
Get it either way:
  - on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist
  - on a machine with internet: deepclean run --download --data-dir DATA
    (torchvision downloads it into DATA), or copy the four *-ubyte.gz files there.
MSG
exit 1
