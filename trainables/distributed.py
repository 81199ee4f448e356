"""Data parallelism inside one trial.

Every worker holds the whole frozen (quantized) base and the same LoRA adapter, trains on its share
of each global batch and sums the adapter's gradients with one flat all-reduce per optimizer step.
The adapter's gradients are a few MB, so that is all the traffic. torch's DDP wrapper is not used:
it broadcasts every parameter and buffer at construction, the 4-bit base included, and buys
nothing for parameters this small. Without an initialized process group every helper is a no-op,
so the single-worker path runs the same code.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(items: Sequence[T], rank: int, world: int) -> list[T]:
    """This worker's share of a global batch: every ``world``-th item, so that workers of a
    length-sorted batch get similar lengths."""
    return list(items[rank::world])


def broadcast_(tensors: list[torch.Tensor]) -> None:
    """Make every worker's tensors equal to rank 0's."""
    if rank_and_world()[1] == 1 or not tensors:
        return
    flat = _flatten([t.data for t in tensors])
    dist.broadcast(flat, 0)
    for t, f in zip(tensors, _unflatten(flat, tensors)):
        t.data.copy_(f)


def sum_gradients_(params: list[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` over all workers (missing gradients count as zero)."""
    if rank_and_world()[1] == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _flatten(grads)
    dist.all_reduce(flat)
    for p, g in zip(params, _unflatten(flat, grads)):
        p.grad = g.to(p.dtype)


def _flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One contiguous buffer holding ``tensors`` (of one dtype) end to end: one collective for all."""
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflatten(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like ``like`` (the inverse of :func:`_flatten`)."""
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in like]), like)]


def sum_floats(*values: float, dev: torch.device) -> list[float]:
    """The sums of a few numbers over all workers."""
    if rank_and_world()[1] == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()


def gather_rows(local: torch.Tensor, n: int, rank: int, world: int) -> torch.Tensor:
    """Reassemble ``[n, ...]`` rows computed as ``share(range(n), rank, world)`` on each worker."""
    if world == 1:
        return local
    parts: list = [None] * world
    dist.all_gather_object(parts, local.cpu())
    out = torch.empty((n, *local.shape[1:]), dtype=local.dtype)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out
