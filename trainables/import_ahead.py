"""A trial's heavy imports, started in a Ray worker before any trial reaches it.

A fresh trial process imports torch, transformers' model and tokenizer machinery, MLflow and
scikit-learn: on an H200 host about 10 s of the 24 s from a lone fresh process's start to its first
training step (``benchmarks/first_wave.py``). Ray starts a study's first worker processes while the
driver is still setting up Tune, seconds before it hands them their trials. :func:`start`, Ray's
``worker_process_setup_hook`` for a study's jobs, uses that idle time: it imports those modules in a
thread of their own. A trial's function calls :func:`wait` before its own imports, so the trial never
imports beside the thread; Ray's own imports for handing over the trial (``ray.tune``'s) may, and the
thread imports nothing of Ray's.

Only modules that leave CUDA uninitialised are imported here. CUDA reads ``CUDA_VISIBLE_DEVICES``
once, when it initialises; Ray sets that variable only when it hands the worker a trial and its GPU.
bitsandbytes and peft initialise CUDA when imported, so the trial imports them itself.
"""

from __future__ import annotations

import importlib
import os
import threading
import time

HOOK = f"{__name__}.start"
"""Ray's ``worker_process_setup_hook`` value for a study."""
CHAINED_HOOK = "QLORA_TUNE_WORKER_SETUP_HOOK"
"""A further hook (``module.function``) run first, as :func:`tuner.ray_cluster.connect` documents."""

MODULES = (
    "torch",
    "transformers.modeling_utils",
    "transformers.models.llama.modeling_llama",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "safetensors.torch",
    "mlflow.tracking",
    "sklearn.metrics",
)
"""What a trial imports that takes time and leaves CUDA uninitialised (checked on an H200 by
``benchmarks/check_gpu_paths.py``)."""

SWITCH = "QLORA_TUNE_IMPORT_AHEAD"
"""``1``: import ahead; ``0``: never; ``auto`` (the default): where the worker's node has a GPU. On a
node of CPUs only, trials wait for no GPU, and a worker that never gets a trial (Ray starts one per
CPU; a data-parallel trial's queues are workers too) would take those CPUs from the trials."""

_thread: threading.Thread | None = None


def _wanted(switch: str) -> bool:
    if switch in ("0", "1"):
        return switch == "1"
    try:
        from trainables.compat import local_gpu_count  # NVML through Ray: CUDA stays uninitialised

        return local_gpu_count() > 0
    except Exception:  # noqa: BLE001 - no way to tell: leave the worker as Ray made it
        return False


def start() -> None:
    """Run the chained hook, if any, then import :data:`MODULES` in a daemon thread where wanted."""
    global _thread
    chained = os.environ.get(CHAINED_HOOK)
    if chained:
        module, _, fn = chained.rpartition(".")
        getattr(importlib.import_module(module), fn)()
    if not _wanted(os.environ.get(SWITCH, "auto")):
        return
    _thread = import_in_background(MODULES)


def wait() -> float | None:
    """Return once the imports :func:`start` began are done: the seconds waited for them (0 where they
    were done already), or None where none began (a worker of another job, or the feature off)."""
    if _thread is None:
        return None
    t0 = time.perf_counter()
    _thread.join()
    return time.perf_counter() - t0


def import_in_background(modules: tuple[str, ...]) -> threading.Thread:
    """Import ``modules`` in a daemon thread of their own, started and returned. Whoever imports one of
    them later waits for the thread where it is still at that one; one that fails here fails again,
    and is reported, there. (The study's driver uses it too, while Ray starts.)"""

    def run() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - see above
                pass

    thread = threading.Thread(target=run, name="qlora-tune-imports", daemon=True)
    thread.start()
    return thread
