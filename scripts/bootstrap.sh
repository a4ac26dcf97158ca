#!/usr/bin/env bash
# Create .venv with adv and its dependencies; idempotent (skips when pyproject.toml is unchanged).
# torch/torchvision come from PyPI: a machine-local pip find-links (e.g. a CPU-only torch wheel
# without a matching torchvision) is ignored on purpose.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.adv-installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ -f "$stamp" ]; then exit 0; fi
"$PY" -c 'import sys; assert sys.version_info >= (3, 10), "adv needs Python >= 3.10"' 
if [ ! -x .venv/bin/python ] && ! "$PY" -m venv .venv 2>/dev/null; then
    # Debian splits venv out of the interpreter package.
    rm -rf .venv
    SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo -n"
    $SUDO apt-get install -y -q python3-venv >/dev/null || { echo "[bootstrap] need python3-venv: apt-get install python3-venv" >&2; exit 1; }
    "$PY" -m venv .venv
fi
echo "[bootstrap] installing adv and its dependencies into .venv (torch is a large download)..." >&2
PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= .venv/bin/python -m pip install -q --progress-bar off \
    --disable-pip-version-check -e ".[test]"
rm -f .venv/.adv-installed-*
touch "$stamp"
