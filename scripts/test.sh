#!/usr/bin/env bash
# Run the whole test suite (real Ray cluster, real MLflow server, real models on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
exec python -m pytest -v --timeout=1800 "$@"
