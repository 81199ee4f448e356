#!/usr/bin/env bash
# Run benchmark parts on the GPU machine (see BENCHMARKS.md for the whole recipe):
#   bash benchmarks/gpu_run.sh speed mfu
# Expects .devbundle/ (../shared/gpu/make-bundle), .devdata/ (the twitter-financial-news CSVs) and the
# SmolLM2 GGUF at $GGUF (default /root/stash/SmolLM2-135M-Instruct.Q4_1.gguf).
set -u
mkdir -p /tmp/site && tar -C /tmp/site -xJf .devbundle/devbundle.tar.xz
# the bundle's importlib_metadata wants a `lazy_importer` it lacks: re-export the standard library's
rm -rf /tmp/site/importlib_metadata && mkdir /tmp/site/importlib_metadata
printf 'from importlib.metadata import *\nfrom importlib.metadata import packages_distributions, version, PackageNotFoundError, distributions, Distribution, metadata, requires\n' \
  > /tmp/site/importlib_metadata/__init__.py
export PYTHONPATH=/tmp/site:$PWD QLORA_TUNE_HOME=/root/qth NCCL_NVLS_ENABLE=0
export QLORA_TUNE_SMOLLM2_GGUF=${GGUF:-/root/stash/SmolLM2-135M-Instruct.Q4_1.gguf}
export MLFLOW_ALLOW_FILE_STORE=true BENCH_RESULTS=${OUT:-$PWD/benchmarks}/results.json TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
[ -f benchmarks/results.json ] && [ ! -f "$BENCH_RESULTS" ] && cp benchmarks/results.json "$BENCH_RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for part in "$@"; do
  echo "== $part"
  timeout "${PART_TIMEOUT:-420}" python benchmarks/bench.py "$part" 2>&1 | grep -v -E "Loading weights|Warning|warnings.warn|^\s*$" | tail -60
done
