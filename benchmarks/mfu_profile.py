"""Where an NF4/dequantized LoRA step of a random Llama shape spends its GPU time: CUDA kernel time by
kernel (torch.profiler over eager steps, so every kernel shows), and the GEMMs' share of it.

    python benchmarks/mfu_profile.py 1b [deq] [liger] [fused] [batch=32] [seq=256]
"""

from __future__ import annotations

import sys
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
model, n_lin = bench.nf4_model(shape)
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


for _ in range(3):
    step()
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
total = sum(e.self_device_time_total for e in events)
gemm = sum(e.self_device_time_total for e in events if any(k in e.key.lower() for k in ("gemm", "cutlass", "sm90", "nvjet", "xmma")))
print(f"{shape} {args[1:]}: GPU time per step {total / 3 / 1e3:.1f} ms, GEMM share {gemm / total:.1%}, "
      f"MFU at kernel time (no host gaps) {4 * n_lin * batch * seq / (total / 3 / 1e6) / bench.PEAK_BF16:.1%}")
for e in sorted(events, key=lambda e: -e.self_device_time_total)[:22]:
    print(f"{e.self_device_time_total / total:6.1%} {e.count // 3:5d}/step  {e.key[:110]}")
