"""LoRA on a plain linear layer as one autograd function (``training.fused_lora``).

peft computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: besides the three matmuls, a scaling
kernel and a sum kernel over the whole ``[tokens, out]`` output in the forward pass, a scaling kernel
in the backward, and a second sum where autograd adds the two paths' gradients for ``x``. On the
Llama-3.2-1B shape those element-wise kernels took about a fifth of an H200's time per step
(``benchmarks/mfu_profile.py``). Here the scaled LoRA product is added inside the output's matmul
(``addmm_``, the sum in cuBLAS's epilogue), and the backward does the same for ``x``'s gradient.
The result is the same up to rounding (one rounding of the sum instead of three).

The layers stay peft's (same weights, names and saved adapters): :func:`fuse_lora_layers` only gives
the eligible ones a ``forward`` that takes the fused path where it applies and peft's otherwise.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as LoraLinear


class _LoraLinear(torch.autograd.Function):
    """``y = x W^T + b + s (d(x) A^T) B^T`` for a frozen ``W`` (and ``b``) and trainable ``A``, ``B``;
    ``d(x)`` is ``x`` itself when ``xd`` is None (no dropout), so both paths' gradients for ``x`` sum
    inside one matmul."""

    @staticmethod
    def forward(ctx, x, xd, weight, bias, a, b, scaling: float):
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dt)
        xd2 = x2 if xd is None else xd.reshape(-1, shape[-1]).to(dt)
        w, a_c, b_c = weight.to(dt), a.to(dt), b.to(dt)
        y = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias.to(dt), x2, w.t())
        h = torch.mm(xd2, a_c.t())
        y.addmm_(h, b_c.t(), alpha=scaling)
        # x itself is needed for A's gradient only where it is what A saw (no dropout)
        ctx.save_for_backward(x2 if xd is None else None, xd2 if xd is not None else None, w, a_c, b_c, h)
        ctx.scaling, ctx.shape, ctx.dtypes = scaling, shape, (x.dtype, a.dtype, b.dtype)
        ctx.has_xd = xd is not None
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xd2, w, a_c, b_c, h = ctx.saved_tensors
        s, (x_dtype, a_dtype, b_dtype) = ctx.scaling, ctx.dtypes
        dy2 = dy.reshape(-1, dy.shape[-1]).to(w.dtype)
        dh = torch.mm(dy2, b_c).mul_(s)  # [tokens, r]: small
        dx = dxd = da = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(dy2, w)
            if not ctx.has_xd:
                dx.addmm_(dh, a_c)
            dx = dx.reshape(ctx.shape).to(x_dtype)
        if ctx.has_xd and ctx.needs_input_grad[1]:
            dxd = torch.mm(dh, a_c).reshape(ctx.shape).to(x_dtype)
        if ctx.needs_input_grad[4]:
            da = torch.mm(dh.t(), xd2 if ctx.has_xd else x2).to(a_dtype)
        if ctx.needs_input_grad[5]:
            db = torch.mm(dy2.t(), h).mul_(s).to(b_dtype)
        return dx, dxd, None, None, da, db, None


class FusedLoraLinear(LoraLinear):
    """peft's LoRA ``Linear`` whose forward is one :class:`_LoraLinear` where it applies: one active
    plain adapter (no DoRA or other variant), not merged, adapters enabled, a plain ``nn.Linear``
    base whose weights do not train, no per-row adapter names. Anything else goes to peft."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or not self._fusable():
            return super().forward(x, *args, **kwargs)
        name = self.active_adapters[0]
        dropout = self.lora_dropout[name]
        xd = None if isinstance(dropout, torch.nn.Identity) else dropout(x)
        base = self.base_layer
        return _LoraLinear.apply(x, xd, base.weight, base.bias, self.lora_A[name].weight,
                                 self.lora_B[name].weight, float(self.scaling[name]))

    def _fusable(self) -> bool:
        active = self.active_adapters
        base = self.base_layer
        return (not self.disable_adapters and not self.merged and len(active) == 1
                and active[0] in self.lora_A and active[0] not in self.lora_variant
                and type(base) is torch.nn.Linear and not base.weight.requires_grad
                and (base.bias is None or not base.bias.requires_grad))


def fuse_lora_layers(model) -> int:
    """Give each of ``model``'s peft LoRA ``Linear`` layers over a plain ``nn.Linear`` the fused
    forward (:class:`FusedLoraLinear`, a subclass adding nothing but that). Returns how many."""
    n = 0
    for m in model.modules():
        if type(m) is LoraLinear and type(m.base_layer) is torch.nn.Linear:
            m.__class__ = FusedLoraLinear
            n += 1
    return n
