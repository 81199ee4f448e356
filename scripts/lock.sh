#!/usr/bin/env bash
# Refresh requirements.lock: the exact versions of every dependency (test tools included) for
# Linux x86_64, Python 3.11, resolved from pyproject.toml's ranges. Run the tests after refreshing.
#
# uv resolves in about a second and writes a plain requirements file that pip installs, so the
# setup needs nothing but pip. torch is left out of the lock: scripts/setup.sh installs the CPU build
# first (pip install torch==2.13.0). To resolve against that build's metadata (and not pull CUDA
# packages into the lock), uv is pointed at the folder holding the CPU wheel: TORCH_WHEELS.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
command -v uv >/dev/null || python -m pip install -q uv
TORCH_WHEELS=${TORCH_WHEELS:-/opt/wheels}
uv pip compile pyproject.toml --extra test \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --find-links "$TORCH_WHEELS" --override scripts/lock-overrides.txt --no-emit-package torch \
  --custom-compile-command "bash scripts/lock.sh" \
  -o requirements.lock "$@"
