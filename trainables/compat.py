"""Every use of a library's private or undocumented API, in one place, each with the reason.

``tests/test_compat.py`` exercises each of them against the installed versions, so an upgrade that
moves or changes one fails there, by name, rather than somewhere deep in a study.
"""

from __future__ import annotations

# ------------------------------------------------------------------ bitsandbytes: CPU packing format
#
# bitsandbytes >= 0.50 converts an NF4 ``Linear4bit`` on a CPU with AVX512-BF16 into a "packing
# format" the first time the layer runs in eval mode (``Linear4bit.forward``). From then on its
# forward goes through ``gemv_4bit``, which (a) has no autograd kernel, so no gradient reaches the
# layer's input when training goes on after an evaluation, and (b) computes with bf16 block scales, so
# its outputs drift by ~1e-3 from the NF4 weights and vary with the batch shape. qlora-tune keeps every
# 4-bit layer out of that format: training, evaluation and prediction all run the same dequantizing
# path, on every CPU. The switch is the public attribute ``support_avx512bf16_for_cpu`` that
# ``Linear4bit.__init__`` sets; undoing a conversion needs bitsandbytes' private inverse.


def keep_4bit_out_of_cpu_packing(model) -> int:
    """Turn the CPU packing format off for every 4-bit layer of ``model`` and undo it where it was
    already applied. Returns how many layers had to be unpacked (0 on GPUs and older bitsandbytes)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return 0
    unpacked = 0
    for m in model.modules():
        if not isinstance(m, Linear4bit):
            continue
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
        state = getattr(m.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu_inverse(m.weight.data, state)
            unpacked += 1
    return unpacked
