#!/usr/bin/env bash
# A study's trials/hour with reused workers (the default) and with a fresh process per trial, on the
# CPU: the demo study on the tiny random Llama, 8 trials, 2 at a time, ASHA. Wall clock of `qlora-tune
# run` each (Ray's and MLflow's start included alike).
#   bash benchmarks/reuse_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
for reuse in true false; do
  start=$(date +%s.%N)
  qlora-tune run examples/demo-study.yaml --name "reuse-$reuse-$(date +%s)" --set model=tiny-random-llama \
    --set num_trials=8 --set reuse_actors=$reuse > "/tmp/reuse-$reuse.log" 2>&1
  end=$(date +%s.%N)
  python -c "import sys; s = float(sys.argv[2]) - float(sys.argv[1]); print(f'reuse_actors={sys.argv[3]}: 8 trials in {s:.1f} s, {8 * 3600 / s:.0f} trials/hour')" "$start" "$end" "$reuse"
done
