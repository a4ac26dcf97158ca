#!/usr/bin/env bash
# Make Fashion-MNIST available offline: Debian's dataset-fashion-mnist package when apt works,
# otherwise adv falls back to a torchvision download (--download) at run time.
set -uo pipefail
if [ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then exit 0; fi
SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo -n"
if command -v apt-get >/dev/null; then
    echo "[data] installing Debian package dataset-fashion-mnist..." >&2
    ($SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
        || ($SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) \
        && exit 0
fi
echo "[data] Debian package unavailable; Fashion-MNIST will be downloaded by torchvision" >&2
exit 0
