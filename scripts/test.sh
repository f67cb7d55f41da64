#!/usr/bin/env bash
# Set up if needed, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export FLWR_TELEMETRY_ENABLED=0
exec .venv/bin/python -m pytest -q "$@"
