#!/usr/bin/env bash
# The README's first command: set up .venv (scripts/setup.sh, as CI does), then run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
qlora-tune demo "$@"
