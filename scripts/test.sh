#!/usr/bin/env bash
# Set up if needed, then run a test tier; other arguments go to pytest.
#
#   ./scripts/test.sh          # ruff, then the default tier: unit and integration tests, not the e2e drills
#   ./scripts/test.sh --e2e    # the e2e tier: Ray federations, netns drills, compose processes, and
#                              # the gRPC queue fuzz at 400 examples
#   ./scripts/test.sh --all    # both tiers in one run
set -euo pipefail
cd "$(dirname "$0")/.."
tier=default
case "${1:-}" in
    --e2e) tier=e2e; shift ;;
    --all) tier=all; shift ;;
esac
./scripts/setup.sh
export FLWR_TELEMETRY_ENABLED=0
case "$tier" in
    default) .venv/bin/ruff check . && exec .venv/bin/python -m pytest -q -m "not e2e" "$@" ;;
    e2e) FEDCL_FUZZ_EXAMPLES=400 exec .venv/bin/python -m pytest -q -m "e2e or fuzz" "$@" ;;
    all) FEDCL_FUZZ_EXAMPLES=400 exec .venv/bin/python -m pytest -q "$@" ;;
esac
