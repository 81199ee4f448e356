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
* lazy initialisation outside the graph: each bucket's first steps (two for the first bucket, one for
  each later one: the process is initialised by then) run on a side stream before its capture, and
  the weights and optimizer state are put back afterwards, so warming up trains nothing (and the
  memory it cached goes back to the device: :func:`trainables.graphs.warm_up`).

A step that a graph cannot hold (an operation that waits on the host, say) fails its capture; the
run then goes on eagerly, and :attr:`StepGraphs.failed` says why (``log`` gets it, once).
``capture=False`` runs the same padded steps eagerly (and the same warm-up and restore): the CPU tests
check it against the plain loop.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, ContextManager

import torch

from trainables.graphs import bucket_length, capture_graph, warm_up

Batch = dict[str, torch.Tensor]
WARMUP_STEPS = (2, 1)
"""Warm-up steps before the first bucket's capture (lazy initialisation: cuBLAS, autograd, the
optimizer's state), and before each later one's (the new shape's own kernels and workspace)."""


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
        self.graphs: dict[int, tuple[Batch, torch.Tensor, object | None]] = {}
        self.failed: str | None = None
        """Why a capture failed (the steps then run eagerly, padded as before); None while none has."""
        self.build_seconds = 0.0
        """Seconds spent warming up and capturing (a trial's start-up cost of its graphs)."""
        self.build_parts = {"warm_up": 0.0, "capture": 0.0}
        """``build_seconds`` in parts: the warm-up steps, and the captures (tracing a step and
        instantiating its graph); the rest is copying the batch and putting the weights back."""
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
        if key not in self.graphs:
            self._build(key, batch)
        static, loss, graph = self.graphs[key]
        for k, buf in static.items():
            buf.copy_(batch[k], non_blocking=True)
        if graph is None:
            with self.context():
                return self._step(static)
        graph.replay()
        return loss

    def _step(self, batch: Batch) -> torch.Tensor:
        """The step itself: what a graph captures, and what runs eagerly."""
        torch._foreach_zero_(self.grads)
        loss = self.loss_fn(batch)
        loss.backward()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
        self.optimizer.step()
        return loss.detach()

    def _build(self, key: int, like: Batch) -> None:
        t0 = time.perf_counter()
        static = {k: v.to(self.dev).clone() for k, v in like.items()}
        graph, loss = None, torch.zeros((), device=self.dev)
        if self.failed is None:
            saved = self._snapshot()
            t1 = time.perf_counter()
            with self.context():
                warm_up(lambda: self._step(static), self.dev, WARMUP_STEPS[bool(self.graphs)])
            self.build_parts["warm_up"] += time.perf_counter() - t1
            self._restore(saved)
            if self.capture:
                try:
                    t1 = time.perf_counter()
                    with self.context():
                        graph, loss = capture_graph(lambda: self._step(static), self.pool)
                    torch.cuda.synchronize(self.dev)
                    self.build_parts["capture"] += time.perf_counter() - t1
                except Exception as e:  # noqa: BLE001 - a step graphs cannot hold: train eagerly instead
                    self.failed = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
                    self.log(f"training.cuda_graphs: a step could not be captured ({self.failed}); "
                             "training goes on without graphs")
                    self.capture, graph, loss = False, None, torch.zeros((), device=self.dev)
                    self._restore(saved)
        self.graphs[key] = (static, loss, graph)
        self.build_seconds += time.perf_counter() - t0  # the warm-up and the capture each end synchronized

    @property
    def captured(self) -> int:
        """How many length buckets replay from a graph."""
        return sum(g is not None for _, _, g in self.graphs.values())

    def _snapshot(self) -> tuple[list[torch.Tensor], dict]:
        with torch.no_grad():
            weights = [p.detach().clone() for p in self.params]
        state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in self.optimizer.state[p].items()}
                 for p in self.params if p in self.optimizer.state}
        return weights, state

    def _restore(self, saved: tuple[list[torch.Tensor], dict]) -> None:
        """Weights and optimizer state as before the warm-up steps, in place (a graph keeps addresses);
        state the warm-up created goes back to AdamW's initial zeros."""
        weights, state = saved
        with torch.no_grad():
            for p, w in zip(self.params, weights):
                p.copy_(w)
            for p in self.params:
                before = state.get(id(p))
                for k, v in self.optimizer.state.get(p, {}).items():
                    if torch.is_tensor(v):
                        v.copy_(before[k]) if before is not None else v.zero_()
