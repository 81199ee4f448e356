"""CUDA graphs for scoring: a frozen model's scoring pass, captured once per batch shape and replayed.

A small model's forward pass is bound by kernel launches, not arithmetic: SmolLM2-135M took about
50 ms per serving batch on an H200 whatever the batch size (BENCHMARKS.md, issue 13). A replayed
graph launches all of a pass's kernels at once. Shapes are few because batches are padded up to a
bucket (:func:`bucket_rows`, :func:`bucket_length`):

* extra columns are right padding (pad tokens, masked out): causal attention keeps every real token
  from seeing them, and each approach reads its scores at real positions only;
* extra rows are a single unmasked pad token each, scored and dropped; rows never mix in a forward pass.

So a real row's scores are those of an eager pass up to floating-point rounding (kernels differ with
the shape), which the tests check on the CPU through the same padding (``capture=False``).
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from typing import Callable, ContextManager, TypeVar

import torch

from trainables.compat import release_generator_from_capture

Batch = dict[str, torch.Tensor]
T = TypeVar("T")
MIN_LENGTH = 16


def bucket_rows(n: int) -> int:
    """Rows of the graph that scores ``n`` rows: the next power of two."""
    return 1 << max(0, n - 1).bit_length()


def bucket_length(n: int) -> int:
    """Columns of the graph that scores sequences of ``n`` tokens: 16, 32, 48, 64, 96, 128, 192, ...
    (powers of two and their midpoints from 32 on: at most 50% padding)."""
    p = MIN_LENGTH
    while True:
        if n <= p:
            return p
        if p >= 32 and n <= p * 3 // 2:
            return p * 3 // 2
        p *= 2


def warm_up(fn: Callable[[], T], dev: torch.device, times: int = 2) -> T:
    """Run ``fn`` ``times`` and return its last result, so that lazy initialisation (cuBLAS handles,
    autograd, optimizer state) happens before a capture: on a side stream on CUDA, as capture wants;
    plainly elsewhere.

    The blocks the warm-up cached go back to the device afterwards: they belong to a side stream (one
    of PyTorch's pool, a different one each time), so nothing else would reuse them, and each
    bucket's warm-up would keep a whole step's activations reserved. (Before this, graphed trials
    held 22-29 GB each where 8 shared an H200, and a few ran out of memory: BENCHMARKS.md, issue 14.)"""
    side = torch.cuda.Stream(dev) if dev.type == "cuda" else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        for _ in range(times):
            out = fn()
    if side is not None:
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
    return out


def capture_graph(fn: Callable[[], torch.Tensor], pool) -> tuple[object, torch.Tensor]:
    """``fn``'s CUDA work as a graph (in memory ``pool``), and its output: the tensor each replay rewrites.
    Only this thread's CUDA calls can spoil the capture (``thread_local``): a trial process has other
    threads (Ray's, MLflow's) whose work, or garbage collection, may touch the device meanwhile.
    A capture that fails leaves the device's random generator fit for the eager steps that follow."""
    graph = torch.cuda.CUDAGraph()
    collecting = gc.isenabled()
    try:
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            gc.disable()  # no finalizer of an earlier run's objects runs CUDA work inside the capture
            out = fn()
    except Exception:
        release_generator_from_capture()
        raise
    finally:
        if collecting:
            gc.enable()
    return graph, out


@dataclass
class _Captured:
    inputs: Batch
    output: torch.Tensor
    graph: object | None  # torch.cuda.CUDAGraph, None when not captured (CPU tests)


class GraphedScorer:
    """``score(batch) -> [rows, classes]`` replayed from CUDA graphs, one per (rows, length) bucket.

    ``score`` must take a batch of ``input_ids``/``attention_mask`` ``[rows, length]`` (plus any
    ``[rows]`` tensors) and run no host synchronisation (true of the approaches whose
    ``static_scoring`` is set). The model's weights must not move or change while graphs exist.
    Graphs are captured on first use of a shape (or all at once by :meth:`warmup`) and share one
    memory pool: replays must not overlap (one caller at a time), and each result is a copy.

    ``context()`` wraps every pass (e.g. autocast, with its cache off). ``capture=False`` runs the same
    padded batches eagerly (CPU tests of the padding)."""

    def __init__(self, score: Callable[[Batch], torch.Tensor], pad_token_id: int, max_rows: int,
                 dev: torch.device, capture: bool = True, pool=None,
                 context: Callable[[], ContextManager] = contextlib.nullcontext):
        self.score, self.pad, self.max_rows, self.dev, self.context = score, pad_token_id, max_rows, dev, context
        self.capture = capture and dev.type == "cuda"
        self.pool = pool if pool is not None or not self.capture else torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], _Captured] = {}

    @torch.inference_mode()
    def __call__(self, batch: Batch) -> torch.Tensor:
        rows, length = batch["input_ids"].shape
        if rows > self.max_rows:
            return torch.cat([self(_rows(batch, s, s + self.max_rows)) for s in range(0, rows, self.max_rows)])
        key = (bucket_rows(rows), bucket_length(length))
        g = self.graphs.get(key) or self._build(key, batch)
        if g.inputs.keys() != batch.keys():
            raise ValueError(f"batch keys {sorted(batch)} differ from the captured {sorted(g.inputs)}")
        self._fill(g.inputs, batch)
        if g.graph is None:
            with self.context():
                return self.score(g.inputs)[:rows].clone()
        g.graph.replay()
        return g.output[:rows].clone()

    @torch.inference_mode()
    def warmup(self, max_length: int, probe: Callable[[int, int], Batch]) -> int:
        """Capture every bucket up to ``max_rows`` x ``max_length`` now (a server does this before it
        takes requests); ``probe(rows, length)`` makes a batch of that shape with the keys real
        batches have. Returns the number of graphs."""
        lengths = sorted({bucket_length(n) for n in range(1, max_length + 1)})
        rows = 1
        while rows <= bucket_rows(self.max_rows):
            for length in lengths:
                if (rows, length) not in self.graphs:
                    self._build((rows, length), probe(rows, length))
            rows *= 2
        return len(self.graphs)

    # ------------------------------------------------------------------

    def _fill(self, static: Batch, batch: Batch) -> None:
        rows, length = batch["input_ids"].shape
        for k, buf in static.items():  # one host-to-device copy per tensor, straight into the buffer
            if buf.dim() == 2:
                buf.fill_(self.pad if k == "input_ids" else 0)
                buf[:rows, :length].copy_(batch[k], non_blocking=True)
            else:
                buf.zero_()
                buf[:rows].copy_(batch[k], non_blocking=True)
        static["attention_mask"][rows:, 0] = 1  # filler rows: one visible pad token (no empty softmax)

    def _build(self, key: tuple[int, int], like: Batch) -> _Captured:
        rows, length = key
        static = {k: torch.zeros((rows, length) if v.dim() == 2 else (rows,), dtype=v.dtype, device=self.dev)
                  for k, v in like.items()}
        self._fill(static, {k: v[:0] if v.dim() == 1 else v[:0, :0] for k, v in like.items()})
        if not self.capture:
            g = _Captured(static, torch.empty(0), None)
        else:
            with self.context():
                warm_up(lambda: self.score(static), self.dev)
                graph, out = capture_graph(lambda: self.score(static), self.pool)
            g = _Captured(static, out, graph)
        self.graphs[key] = g
        return g


def _rows(batch: Batch, start: int, stop: int) -> Batch:
    return {k: v[start:stop] for k, v in batch.items()}
