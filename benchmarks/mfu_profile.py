"""Where an NF4/dequantized LoRA step of a random Llama shape spends its GPU time: CUDA kernel time by
kernel (torch.profiler over eager steps, so every kernel shows), and the GEMMs' share of it.

    python benchmarks/mfu_profile.py 1b [deq] [liger] [fused] [graphs] [nocudnn] [rpa] [batch=32] [seq=256]

``graphs``: the step replayed from a CUDA graph too (StepGraphs), profiled the same way (kernels
launched from a graph show in the profile): how its kernel time and wall time compare with eager's.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

import bench  # noqa: E402
from trainables.models import lora_inputs_uncast  # noqa: E402

args = sys.argv[1:]
shape = args[0]
opts = dict(a.split("=") for a in args[1:] if "=" in a)
batch, seq = int(opts.get("batch", 32)), int(opts.get("seq", 256))
if "nocudnn" in args:  # PyTorch's flash attention kernels instead of cuDNN's
    torch.backends.cuda.enable_cudnn_sdp(False)
model, n_lin = bench.nf4_model(shape)
if "rpa" in args:  # causal attention without a mask, as the trainer's bases have (models.right_padded_attention)
    from trainables.models import right_padded_attention

    assert right_padded_attention(model)
if "deq" in args:
    bench.dequantize_layers(model)
if "liger" in args:
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=model)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="SEQ_CLS"))
for p in model.parameters():
    if p.requires_grad:
        p.data = p.data.float()
lora_inputs_uncast(model)
if "fused" in args:
    from trainables.fused_lora import fuse_lora_layers

    print("fused LoRA layers:", fuse_lora_layers(model))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
x = torch.randint(1, 128000, (batch, seq), device="cuda")
y = torch.randint(0, 3, (batch,), device="cuda")


def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits.float(), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)




def profile(run, label: str) -> float:
    """Kernel time per step of ``run`` (3 steps under the profiler), its GEMM share and top kernels,
    and its wall time per step (20 steps, not profiled); returns the kernel time per step (s)."""
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            run()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events)
    gemm = sum(e.self_device_time_total for e in events if any(k in e.key.lower() for k in ("gemm", "cutlass", "sm90", "nvjet", "xmma")))
    t = time.perf_counter()
    for _ in range(20):
        run()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / 20
    per = total / 3 / 1e6
    mfu = 4 * n_lin * batch * seq / bench.PEAK_BF16
    print(f"{shape} {args[1:]} {label}: kernel time per step {per * 1e3:.1f} ms ({sum(e.count for e in events) // 3} kernels), "
          f"wall {wall * 1e3:.1f} ms; GEMM share {gemm / total:.1%}; MFU at kernel time {mfu / per:.1%}, wall {mfu / wall:.1%}")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:22]:
        print(f"{e.self_device_time_total / total:6.1%} {e.count // 3:5d}/step  {e.key[:110]}")
    return per


profile(step, "eager")
if "graphs" in args:  # the same step replayed from a CUDA graph, as the trainer runs it (training.cuda_graphs)
    from trainables.step_graphs import StepGraphs, make_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    gopt = make_optimizer(params, 1e-4, 0.0, x.device)
    graphed = StepGraphs(lambda b: torch.nn.functional.cross_entropy(model(input_ids=b["input_ids"]).logits.float(), b["labels"]),
                         lambda b, rows, length: b, params, gopt, 0.0, batch, x.device,
                         context=lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False))
    cpu_batch = {"input_ids": x.cpu().pin_memory(), "labels": y.cpu().pin_memory()}
    for _ in range(6):  # warm-up, capture and the timed replays
        graphed(cpu_batch)
    print("graphs failed:", graphed.failed)
    profile(lambda: graphed(cpu_batch), "graphed")
