"""Issue 14's last lever, measured before it is adopted: several trials' LoRA adapters trained together in
one process over one shared NF4 base (batched LoRA, as mLoRA and PLoRA do), against one adapter per
step, which is what each of the packed trial processes runs (``bench.py packing``, same call).

Each of the ``k`` adapters is a stacked slice of every LoRA weight (``[k, in, r]`` and ``[k, r, out]``)
and of the classification head; a step takes ``k`` groups of ``rows`` rows, runs the frozen base once
over all of them (one large matmul per layer) and each group through its own adapter (batched matmuls).
The groups' losses are summed, so each adapter gets exactly its own gradients. The step is replayed
from a CUDA graph (:class:`trainables.step_graphs.StepGraphs`), as our trials' steps are.

    python benchmarks/multi_adapter.py [SHAPE] [ROWS] [LENGTH] [K,...]   # defaults: 135m 32 64 1,2,4,8,16

Prints and records (``BENCH_RESULTS``) samples/s for each ``k`` (all adapters' rows) and the gain over
``k`` = 1. Speed only: random weights and tokens.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


class StackedLoRA(nn.Module):
    """A frozen linear layer plus ``k`` LoRA adapters, one per group of rows in the batch."""

    def __init__(self, base: nn.Module, k: int, r: int, alpha: float):
        super().__init__()
        self.base, self.k, self.scale = base, k, alpha / r
        dev = base.weight.device
        bound = 1 / math.sqrt(base.in_features)  # peft's default: A uniform (Kaiming, a=sqrt(5)), B zero
        self.A = nn.Parameter(torch.empty(k, base.in_features, r, device=dev).uniform_(-bound, bound))
        self.B = nn.Parameter(torch.zeros(k, r, base.out_features, device=dev))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        groups = x.reshape(self.k, -1, x.shape[-1])  # [k, rows * length, in]: group g is adapter g's rows
        delta = torch.bmm(torch.bmm(groups, self.A.to(x.dtype)), self.B.to(x.dtype))
        return y + self.scale * delta.reshape(y.shape).to(y.dtype)


class StackedHead(nn.Module):
    """``k`` classification heads (each a linear layer on the hidden states), one per group of rows."""

    def __init__(self, hidden: int, classes: int, k: int, dev):
        super().__init__()
        self.k = k
        self.W = nn.Parameter(torch.randn(k, hidden, classes, device=dev) * hidden ** -0.5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = torch.bmm(h.reshape(self.k, -1, h.shape[-1]), self.W.to(h.dtype))
        return out.reshape(*h.shape[:-1], -1)


def stack_adapters(model, k: int, r: int = 16, alpha: float = 32.0) -> list[nn.Parameter]:
    """Wrap every linear layer of the decoder in :class:`StackedLoRA` and replace the head; returns
    the trainable parameters (float32, as our adapters are)."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if hasattr(lin, "in_features"):
                    setattr(parent, name, StackedLoRA(lin, k, r, alpha))
    model.score = StackedHead(model.config.hidden_size, model.config.num_labels, k, model.model.embed_tokens.weight.device)
    return [p for n, p in model.named_parameters() if n.endswith((".A", ".B", "score.W"))]


def measure(shape: str, k: int, rows: int, length: int, steps: int = 20) -> dict:
    from bench import PEAK_BF16, nf4_model

    from trainables.step_graphs import StepGraphs, make_optimizer

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU: a check of the code only
    model, n_lin = nf4_model(shape, dev.type)
    params = stack_adapters(model, k)
    for p in params:
        p.requires_grad_(True)
    opt = make_optimizer(params, 1e-4, 0.0, dev)
    cpu = {"input_ids": torch.randint(1, model.config.vocab_size, (k * rows, length)),
           "labels": torch.randint(0, model.config.num_labels, (k * rows,))}
    if dev.type == "cuda":
        cpu = {key: v.pin_memory() for key, v in cpu.items()}

    def loss_fn(b):  # the groups' mean losses, summed: each adapter gets its own gradients
        logits = model(input_ids=b["input_ids"]).logits.float()
        return torch.nn.functional.cross_entropy(logits, b["labels"], reduction="sum") / rows

    graphed = StepGraphs(loss_fn, lambda b, r, l: b, params, opt, 0.0, k * rows, dev,
                         context=lambda: torch.autocast(dev.type, dtype=torch.bfloat16, cache_enabled=False))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t = time.perf_counter()
    for _ in range(3):
        graphed(cpu)
    sync()
    warm = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        graphed(cpu)
    sync()
    secs = (time.perf_counter() - t) / steps
    out = {"k": k, "rows_per_adapter": rows, "length": length, "step_s": secs, "samples_per_s": k * rows / secs,
           "mfu": 4 * n_lin * k * rows * length / secs / PEAK_BF16, "warmup_s": warm, "graphs_failed": graphed.failed,
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
           "losses": [float(graphed(cpu)) for _ in range(2)]}
    graphed = opt = model = params = None
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def main() -> None:
    shape = sys.argv[1] if len(sys.argv) > 1 else "135m"
    rows = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    length = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    ks = [int(k) for k in (sys.argv[4] if len(sys.argv) > 4 else "1,2,4,8,16").split(",")]
    res = {}
    for k in ks:
        try:
            res[k] = measure(shape, k, rows, length)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at a large k: report, go on
            res[k] = {"k": k, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(json.dumps(res[k]), flush=True)
    one = res.get(1, {}).get("samples_per_s")
    out = {"card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "shape": shape, "runs": list(res.values())}
    if one:
        out["gain"] = {k: r["samples_per_s"] / one for k, r in res.items() if "samples_per_s" in r}
        print("gain over one adapter per step:", {k: round(v, 2) for k, v in out["gain"].items()})
    path = Path(os.environ.get("BENCH_RESULTS", ROOT / "benchmarks" / "results.json"))
    old = json.loads(path.read_text()) if path.exists() else {}
    old[f"multi_adapter_{shape}"] = out
    path.write_text(json.dumps(old, indent=2))


if __name__ == "__main__":
    main()
