"""A quick check, on a GPU node, of the code paths no CPU test can reach:
- ``worker_device``: a Ray worker given no GPU computes on the CPU, one given a share on its GPU;
- ``resources_per_trial.gpu: auto`` left to its default: every approach measured in one Ray task;
- a CUDA graph capture that fails leaves dropout working eagerly (compat.release_generator_from_capture);
- the imports a study's workers do ahead of their trials (trainables.import_ahead) leave CUDA
  uninitialised, so the GPU Ray gives the trial later is the one it uses.

    python benchmarks/check_gpu_paths.py import_ahead      # that last check alone

    bash benchmarks/gpu_run.sh check_gpu_paths.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def failed_capture_then_dropout() -> None:
    """A capture spoiled by a host sync inside it, then eager dropout: it raises unless the capture's
    failure released the generator (trainables.graphs.capture_graph does)."""
    import torch

    from trainables.graphs import capture_graph

    x = torch.ones(64, device="cuda")
    try:
        capture_graph(lambda: torch.nn.functional.dropout(x, 0.5).sum() + x.sum().item(), None)
        print("failed capture: the capture did not fail (check not run)")
    except Exception as e:  # noqa: BLE001
        kept = torch.nn.functional.dropout(x, 0.5).count_nonzero().item()
        print(f"failed capture ({type(e).__name__}) then eager dropout: ok ({kept} of 64 kept)", flush=True)


def import_ahead_leaves_cuda_alone() -> None:
    """In a fresh process, import what :mod:`trainables.import_ahead` imports, then ask the CUDA driver
    for its device count: it answers CUDA_ERROR_NOT_INITIALIZED (3) unless something called cuInit."""
    import subprocess

    code = ("import ctypes, importlib; from trainables import import_ahead as A\n"
            "for m in A.MODULES: importlib.import_module(m)\n"
            "n = ctypes.c_int(); rc = ctypes.CDLL('libcuda.so.1').cuDeviceGetCount(ctypes.byref(n))\n"
            "print('import ahead: cuDeviceGetCount returned', rc, '(3: CUDA not initialised, as it must be)')\n"
            "raise SystemExit(0 if rc == 3 else 1)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def main() -> None:
    if sys.argv[1:] == ["import_ahead"]:
        import_ahead_leaves_cuda_alone()
        return
    import_ahead_leaves_cuda_alone()
    failed_capture_then_dropout()
    import ray
    import yaml

    from tuner.packing import resolve_auto_gpu
    from tuner.ray_cluster import connect
    from tuner.study_config import load_study

    connect(None)

    def where() -> str:
        from trainables.models import worker_device

        return str(worker_device())

    print("worker_device with 0 / 0.5 GPU:", ray.get([ray.remote(num_gpus=0)(where).remote(),
                                                       ray.remote(num_gpus=0.5)(where).remote()]), flush=True)
    study = {"model": "tiny-random-llama", "data": {"train": str(ROOT / ".devdata" / "train2000.csv"),
                                                   "label_names": ["Bearish", "Bullish", "Neutral"]},
             "search": {"approach": {"choice": ["head", "generation"]}, "training.batch_size": {"choice": [16, 64]}}}
    path = Path("/tmp/check-study.yaml")
    path.write_text(yaml.safe_dump(study))
    s, space = load_study(path)
    print("default gpu:", s.resources_per_trial.gpu, flush=True)
    t = time.perf_counter()
    got = resolve_auto_gpu(s, space, str(path), ["Bearish", "Bullish", "Neutral"], ray.cluster_resources())
    print(f"resolved gpu: {got.resources_per_trial.gpu:.4g} in {time.perf_counter() - t:.1f} s", flush=True)


if __name__ == "__main__":
    main()
