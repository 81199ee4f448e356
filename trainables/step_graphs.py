"""CUDA graphs for training: a whole optimizer step (gradients zeroed, forward, loss, backward,
gradient clipping, AdamW) captured once per batch shape and replayed.

A small model's training step is bound by kernel launches and Python, not arithmetic: SmolLM2-135M's
step took about 200 ms on an H100 at batch 32 or 128 alike (../NOTES.md), with the GPU idle most of the
time, and a trial alone on an H200 kept it 13.5% busy (BENCHMARKS.md, issue 16). A replayed graph
launches all of a step's kernels at once.

Shapes are few: every batch is padded to ``batch_size`` rows and its columns up to a length bucket
(:func:`trainables.graphs.bucket_length`) by the approach (:meth:`Approach.pad_to`: right padding,
which causal attention keeps every real token from seeing, filler rows whose targets are ignored,
and static label positions for generation). The last, shorter batch of an epoch replays the same
graph: no step runs eagerly, so no eager step's memory stays cached beside the graphs' pool. The
trainer's loss runs without the padding mask, as graphed scoring does: transformers' mask logic
reads the mask on the host, which capture forbids.

What a graph needs, and gets here:

* gradients that never move: they are allocated once, zeroed in place inside the step, and kept;
* an optimizer that runs on the device alone: fused AdamW with ``capturable=True`` and the learning
  rate as a device tensor, which the scheduler fills in place (:func:`make_optimizer`);
* lazy initialisation outside the graph: each bucket's first step, and the run's first two, are real
  training steps run eagerly on a side stream (:func:`trainables.graphs.warm_up`, which gives the
  memory they cached back to the device); the bucket's next batch is captured, and replayed. Warming
  up thus trains, as the plain loop would, and costs each bucket one eager step and one capture.

A step that a graph cannot hold (an operation that waits on the host, say) fails its capture; the
run then goes on eagerly, and :attr:`StepGraphs.failed` says why (``log`` gets it, once).
``capture=False`` runs the same padded steps eagerly: the CPU tests check it against the plain loop.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

from trainables.graphs import bucket_length, capture_graph, warm_up

Batch = dict[str, torch.Tensor]
WARMUP_RUN, WARMUP_BUCKET = 2, 1
"""Eager steps before any capture (lazy initialisation: cuBLAS, autograd, the optimizer's state), and
of each bucket's own shape before its capture (its kernels and workspace)."""


def make_optimizer(params: list[torch.Tensor], lr: float, weight_decay: float, dev: torch.device):
    """AdamW that a CUDA graph can capture: fused, ``capturable``, the learning rate a device tensor
    (a float would be baked into the graph; a scheduler fills the tensor in place). On the CPU the
    same tensor learning rate, on the single-tensor path (what the CPU tests run)."""
    cuda = dev.type == "cuda"
    return torch.optim.AdamW(params, lr=torch.tensor(lr, dtype=torch.float32, device=dev), weight_decay=weight_decay,
                             fused=cuda or None, capturable=cuda, foreach=False if not cuda else None)


class StepGraphs:
    """``step(batch) -> loss``: one optimizer step on a CPU batch of at most ``rows`` rows and any
    length, replayed from a CUDA graph per length bucket.

    ``loss_fn(batch)`` computes the loss of a device batch (under ``context()``: autocast with its
    cache off); ``pad(batch, rows, length)`` pads a CPU batch to ``rows`` x ``length`` with the same
    loss (the approach's :meth:`pad_to`). ``params`` are the trainable weights; the optimizer steps them, and must
    come from :func:`make_optimizer` (its learning rate a tensor). Their gradients are allocated here
    and must stay: nothing else may zero them to None."""

    def __init__(self, loss_fn: Callable[[Batch], torch.Tensor], pad: Callable[[Batch, int, int], Batch],
                 params: list[torch.Tensor], optimizer: torch.optim.Optimizer, max_grad_norm: float, rows: int,
                 dev: torch.device, capture: bool = True,
                 context: Callable[[], ContextManager] = contextlib.nullcontext, log: Callable[[str], object] = print):
        self.loss_fn, self.pad, self.params, self.optimizer, self.log = loss_fn, pad, params, optimizer, log
        self.max_grad_norm, self.rows, self.dev, self.context = max_grad_norm, rows, dev, context
        self.capture = capture and dev.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.graphs: dict[int, _Bucket] = {}
        self.eager_steps = 0
        """Warm-up steps run so far (all buckets)."""
        self.failed: str | None = None
        """Why a capture failed (the steps then run eagerly, padded as before); None while none has."""
        self.build_seconds = 0.0
        """Seconds of the warm-up steps and captures: a trial's start-up cost of its graphs (the
        warm-up steps train, but eagerly, at several times a replay's time)."""
        self.build_parts = {"warm_up": 0.0, "capture": 0.0}
        """``build_seconds`` in parts: the eager warm-up steps, and the captures (tracing a step and
        instantiating its graph)."""
        with torch.no_grad():
            for p in params:  # gradients live here for good: graphs write them in place
                p.grad = torch.zeros_like(p)
        self.grads = [p.grad for p in params]
        self._lrs = [g["lr"] for g in optimizer.param_groups]

    def __call__(self, batch: Batch) -> torch.Tensor:
        for g, lr in zip(self.optimizer.param_groups, self._lrs):
            if g["lr"] is not lr:  # a scheduler that assigns instead of filling: the graphs read this tensor
                lr.fill_(g["lr"])
                g["lr"] = lr
        rows, length = batch["input_ids"].shape
        if rows > self.rows:
            raise ValueError(f"a batch of {rows} rows; the graphs take at most {self.rows}")
        key = bucket_length(length)
        batch = self.pad(batch, self.rows, key)
        b = self.graphs.get(key)
        if b is None:
            b = self.graphs[key] = _Bucket({k: torch.empty_like(v, device=self.dev) for k, v in batch.items()})
        for k, buf in b.inputs.items():
            buf.copy_(batch[k], non_blocking=True)
        if b.graph is not None:
            b.graph.replay()
            return b.loss
        if self.failed is None and (b.warm < WARMUP_BUCKET or self.eager_steps < WARMUP_RUN):
            t0 = time.perf_counter()
            with self.context():
                loss = warm_up(lambda: self._step(b.inputs), self.dev, 1)
            b.warm += 1
            self.eager_steps += 1
            self._spent("warm_up", t0)
            return loss
        if self.capture and self.failed is None and self._capture(b):
            b.graph.replay()
            return b.loss
        with self.context():
            return self._step(b.inputs)

    def _step(self, batch: Batch) -> torch.Tensor:
        """The step itself: what a graph captures, and what runs eagerly."""
        torch._foreach_zero_(self.grads)
        loss = self.loss_fn(batch)
        loss.backward()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
        self.optimizer.step()
        return loss.detach()

    def _capture(self, b: _Bucket) -> bool:
        """Capture bucket ``b``'s step. A capture runs nothing (its kernels are recorded, not
        executed), so one that fails leaves weights and optimizer state as they were."""
        t0 = time.perf_counter()
        try:
            with self.context():
                b.graph, b.loss = capture_graph(lambda: self._step(b.inputs), self.pool)
            if self.dev.type == "cuda":
                torch.cuda.synchronize(self.dev)
            return True
        except Exception as e:  # noqa: BLE001 - a step graphs cannot hold: train eagerly instead
            b.graph = None
            self.failed = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
            self.log(f"training.cuda_graphs: a step could not be captured ({self.failed}); "
                     "training goes on without graphs")
            return False
        finally:
            self._spent("capture", t0)

    def _spent(self, part: str, since: float) -> None:
        took = time.perf_counter() - since  # the warm-up and the capture each end synchronized
        self.build_parts[part] += took
        self.build_seconds += took

    @property
    def captured(self) -> int:
        """How many length buckets replay from a graph."""
        return sum(b.graph is not None for b in self.graphs.values())


@dataclass
class _Bucket:
    inputs: Batch
    """The padded batch's device buffers: each step copies its batch in, the graph reads them."""
    graph: object | None = None
    loss: torch.Tensor | None = None
    """The loss a replay writes."""
    warm: int = 0
    """Eager (warm-up) steps run on this shape."""
