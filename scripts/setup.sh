#!/usr/bin/env bash
# Idempotent setup: virtual environment with the pinned packages, and the default data set.
# The developers' and the demo's set-up; a site machine installs less (deploy/README.md, "Installing a site").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  # a venv cut short (no pip) is made again rather than used half-built
  rm -rf .venv
  "$PY" -m venv .venv
fi
stamp=.venv/.fedcl-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[dev]'
  touch "$stamp"
fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if ! command -v docker-compose >/dev/null 2>&1; then
  # validates docker-compose.yml in the tests (no Docker engine needed)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq docker-compose >/dev/null || \
    echo "warning: docker-compose could not be installed; its validation test will skip"
fi
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
