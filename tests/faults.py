"""Faults injected into Ray's worker processes, through ``QLORA_TUNE_WORKER_SETUP_HOOK`` (Ray's
``worker_process_setup_hook``): each function here runs once in every worker process at its start."""

from __future__ import annotations

import torch


def generation_trials_run_out_of_gpu_memory() -> None:
    """Training a generation trial raises CUDA's out-of-memory error in its first step, as a card
    that is too small would (the CPU has no CUDA allocator to exhaust)."""
    import torch

    from trainables.loop import Trainer

    fit = Trainer.fit

    def fit_or_run_out(self, *args, **kwargs):
        if self.cfg.approach == "generation":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by tests/faults.py)")
        return fit(self, *args, **kwargs)

    Trainer.fit = fit_or_run_out


def head_graphs_fail_and_generation_runs_out_of_gpu_memory() -> None:
    """As :func:`generation_trials_run_out_of_gpu_memory`, and every CUDA-graph capture fails (with
    ``training.cuda_graphs: true``, the CPU runs the padded steps; here they try to capture, as on a
    GPU, and fail as a step that waits on the host would)."""
    import trainables.step_graphs as SG

    generation_trials_run_out_of_gpu_memory()
    init = SG.StepGraphs.__init__

    def init_capturing(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.capture = True

    def fail(fn, pool):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing (injected by tests/faults.py)")

    SG.StepGraphs.__init__ = init_capturing
    SG.capture_graph = fail


class ReplayedEagerly:
    """A stand-in for a CUDA graph on the CPU (``trainables.step_graphs.capture_graph``'s result):
    capturing runs nothing, as a real capture; each replay runs the step and writes its loss into the
    captured output. :func:`capture_eagerly` is the stand-in capture."""

    def __init__(self, fn):
        self.fn, self.out = fn, torch.zeros(())

    def replay(self):
        self.out.copy_(self.fn())


def capture_eagerly(fn, pool):
    g = ReplayedEagerly(fn)
    return g, g.out


def mark_chained_hook_ran() -> None:
    """Leaves a mark in the worker's environment (the import-ahead hook runs this one first)."""
    import os

    os.environ["QLT_CHAINED_RAN"] = "1"
