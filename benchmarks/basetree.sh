#!/usr/bin/env bash
# A baseline to measure beside the working tree in the same GPU call: the source of git revision REV
# (default HEAD) unpacked in .basetree/ (ignored), with .devdata linked in. Carry ".basetree" too, and
# run the baseline's parts from inside it, e.g.:
#   bash benchmarks/basetree.sh b4e970e
#   (cd .basetree && BENCH_PLAN_FIRST=1 bash benchmarks/gpu_run.sh study s64base benchmarks/multigpu.yaml ...)
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .basetree && mkdir .basetree
git archive "${1:-HEAD}" | tar -x -C .basetree
ln -sfn ../.devdata .basetree/.devdata
grep -qx ".basetree/" .git/info/exclude 2>/dev/null || echo ".basetree/" >> .git/info/exclude
echo "baseline $(git rev-parse --short "${1:-HEAD}") in .basetree/"
