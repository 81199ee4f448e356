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

Not every bucket earns a graph. Building one costs an eager step and a capture (about 0.8 s for
SmolLM2-135M on an H200, BENCHMARKS.md), while a small model's replay takes about as long at 48
tokens as at 96: its kernels are launch-bound. Told the lengths of the batches to come
(:meth:`StepGraphs.expect`), a batch whose bucket has no graph yet is padded up to the next longer
bucket that has one, unless its own graph would save more than it costs (:func:`worth_own_graph`,
from the measured replay and build times). The first batch goes to the longest bucket to come,
which needs its graph in any case. Padding up keeps the loss (see :meth:`Approach.pad_to`).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable

import torch

from trainables.graphs import bucket_length, capture_graph, warm_up

Batch = dict[str, torch.Tensor]
WARMUP_RUN, WARMUP_BUCKET = 2, 1
"""Eager steps before any capture (lazy initialisation: cuBLAS, autograd, the optimizer's state), and
of each bucket's own shape before its capture (its kernels and workspace)."""


TIMED_REPLAYS = 3
"""Replays of each new graph timed (synchronized; the fastest counts): what a step of its length costs."""


def worth_own_graph(steps_ahead: int, length: int, up: int, up_seconds: float, build_seconds: float,
                    lo: int = 0, lo_seconds: float = 0.0) -> bool:
    """Whether ``steps_ahead`` steps of ``length`` tokens save more by a graph of their own than the
    ``build_seconds`` it costs, against padding them up to the ``up``-token graph whose replay takes
    ``up_seconds``. A step's time is taken as linear in its length, through the shorter graph
    measured (``lo``, ``lo_seconds``), else through zero (which overstates the saving where launches,
    not arithmetic, bound a step: so this errs towards building)."""
    own = lo_seconds + (up_seconds - lo_seconds) * (length - lo) / (up - lo)
    return steps_ahead * (up_seconds - own) > build_seconds


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
        self.every_bucket = False
        """Build each bucket's own graph, never padding up to a longer one (the ``gpu: auto`` fit,
        which must hold every graph a trial could build)."""
        self.ahead: Counter[int] = Counter()
        """Batches still to come per bucket (:meth:`expect`); none known: every bucket its own graph."""
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

    def expect(self, lengths: Iterable[int], repeats: int = 1) -> None:
        """The batches to come, by their lengths (columns before bucketing), ``repeats`` times over
        (epochs alike): what decides which buckets get a graph of their own."""
        self.ahead = Counter({k: n * repeats for k, n in Counter(map(bucket_length, lengths)).items()})

    def bucket(self, length: int) -> int:
        """The bucket a batch of ``length`` columns runs in: its own, or a longer one with a graph,
        where that costs less than building its own (module docstring)."""
        key = bucket_length(length)
        if key in self.graphs or not (self.capture and self.ahead) or self.every_bucket or self.failed is not None:
            return key
        longer = [k for k in self.graphs if k > key]
        if not longer:  # the longest bucket still to come needs its graph anyway: build that one first
            return max([k for k, n in self.ahead.items() if n > 0 and k > key], default=key)
        up = self.graphs[min(longer)]
        if up.seconds is None:  # not yet captured and timed: it takes this batch too
            return min(longer)
        shorter = [k for k, b in self.graphs.items() if k < key and b.seconds is not None]
        lo = max(shorter, default=0)
        own = worth_own_graph(self.ahead[key], key, min(longer), up.seconds, self.build_seconds / len(self.graphs),
                              lo, self.graphs[lo].seconds if lo else 0.0)
        return key if own else min(longer)

    def __call__(self, batch: Batch) -> torch.Tensor:
        for g, lr in zip(self.optimizer.param_groups, self._lrs):
            if g["lr"] is not lr:  # a scheduler that assigns instead of filling: the graphs read this tensor
                lr.fill_(g["lr"])
                g["lr"] = lr
        rows, length = batch["input_ids"].shape
        if rows > self.rows:
            raise ValueError(f"a batch of {rows} rows; the graphs take at most {self.rows}")
        key = self.bucket(length)
        self.ahead[bucket_length(length)] -= 1
        batch = self.pad(batch, self.rows, key)
        b = self.graphs.get(key)
        if b is None:
            b = self.graphs[key] = _Bucket({k: torch.empty_like(v, device=self.dev) for k, v in batch.items()})
        for k, buf in b.inputs.items():
            buf.copy_(batch[k], non_blocking=True)
        if b.graph is not None:
            self._replay(b)
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
            self._replay(b)
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

    def _replay(self, b: _Bucket) -> None:
        """Replay ``b``'s graph; its first few replays are timed, synchronized (:data:`TIMED_REPLAYS`)."""
        if b.timed >= TIMED_REPLAYS:
            b.graph.replay()
            return
        t0 = time.perf_counter()
        b.graph.replay()
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        took = time.perf_counter() - t0
        b.seconds = took if b.seconds is None else min(b.seconds, took)
        b.timed += 1

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
            length = b.inputs["input_ids"].shape[1]
            self.failed = f"bucket {length}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
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
    seconds: float | None = None
    """A replay's time: the fastest of its first timed ones (None before its first replay)."""
    timed: int = 0
