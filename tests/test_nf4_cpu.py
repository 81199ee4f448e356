"""NF4 training is right on every CPU: gradients flow through the frozen 4-bit weights after an
evaluation pass, as they do through the same weights dequantized (bitsandbytes' CPU packing format,
taken on CPUs with AVX512-BF16, has no backward; see trainables/compat.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import tiny_config
from trainables.approaches import to_device
from trainables.config import RunConfig
from trainables.data import load_dataset
from trainables.loop import Trainer


def _trainer(tiny_csv, approach):
    cfg = RunConfig.model_validate(tiny_config(tiny_csv, approach=approach, **{"lora.dropout": 0.0}))
    return Trainer(cfg, load_dataset(cfg.data), log=lambda *_: None)


def _linear4bit_modules(model):
    from bitsandbytes.nn import Linear4bit

    return [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]


def _dequantized_twin(model):
    """A copy of ``model`` whose 4-bit layers are plain ``nn.Linear`` layers holding the dequantized
    NF4 weights: the reference the 4-bit path must reproduce."""
    import bitsandbytes.functional as BF

    twin = copy.deepcopy(model)
    for name, m in _linear4bit_modules(twin):
        w = BF.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        plain = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        plain.weight.data.copy_(w)
        if m.bias is not None:
            plain.bias.data.copy_(m.bias.data.float())
        plain.requires_grad_(False)
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent), child, plain)
    return twin


def _lora_grads(tr: Trainer, model) -> dict[str, torch.Tensor]:
    batch = to_device(tr.approach.collate(tr.train_examples[:8], train=True), tr.dev)
    model.zero_grad(set_to_none=True)
    tr.approach.loss(model, batch, None).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and "lora_" in n and p.grad is not None}


def _pack_by_hand(model) -> None:
    """What bitsandbytes does to a 4-bit layer's first eval forward on an AVX512-BF16 CPU."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    for _, m in _linear4bit_modules(model):
        m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)
        assert m.weight.quant_state.packing_format_for_cpu


@pytest.mark.parametrize("approach", ["head", "generation"])
@pytest.mark.parametrize("how", ["eval_pass", "packed_by_hand"])
def test_gradients_reach_first_layer_lora_after_eval(tiny_csv, approach, how):
    tr = _trainer(tiny_csv, approach)
    assert _linear4bit_modules(tr.model), "base must be NF4-quantized"
    with torch.no_grad():  # a trained-looking adapter: B = 0 at init would leave A without gradient
        for n, p in tr.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    reference_twin = _dequantized_twin(tr.model)
    tr.evaluate("eval")  # on an AVX512-BF16 CPU this packs every 4-bit layer unless prevented
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for _, m in _linear4bit_modules(tr.model)), "an eval pass packed the 4-bit weights"
    if how == "packed_by_hand":
        _pack_by_hand(tr.model)
    tr.train_mode()
    reference_twin.train()
    got = _lora_grads(tr, tr.model)
    want = _lora_grads(tr, reference_twin)
    first = [n for n in want if ".layers.0." in n]
    assert first, sorted(want)[:5]
    for n in first:
        assert n in got, f"{n}: no gradient through the 4-bit base"
        assert float(got[n].abs().max()) > 0, f"{n}: zero gradient"
    for n, g in want.items():
        # packed_by_hand: unpacking re-quantizes the block scales (bitsandbytes' inverse is lossy)
        tol = 2e-2 if how == "packed_by_hand" else 1e-4
        torch.testing.assert_close(got[n], g, rtol=tol, atol=tol * float(g.abs().max()), msg=n)


@pytest.mark.parametrize("approach", ["head", "generation"])
def test_dequantized_base_trains_the_same_model_as_nf4(tiny_csv, approach):
    """``training.dequantize_base`` computes with the very weights the NF4 layers dequantize to:
    the same loss and LoRA gradients as the 4-bit layers, with no 4-bit layer left."""
    tr = _trainer(tiny_csv, approach)
    cfg = RunConfig.model_validate(tiny_config(tiny_csv, approach=approach, **{"lora.dropout": 0.0,
                                                                               "training.dequantize_base": True}))
    deq = Trainer(cfg, load_dataset(cfg.data), log=lambda *_: None)
    assert _linear4bit_modules(tr.model) and not _linear4bit_modules(deq.model)
    a, b = _lora_grads(tr, tr.model), _lora_grads(deq, deq.model)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)
    tr.fit(), deq.fit()
    for k, v in tr.trainable_state().items():
        torch.testing.assert_close(deq.trainable_state()[k], v, rtol=1e-3, atol=1e-4)


def test_dequantize_base_auto_counts_the_unquantized_base_and_stays_4bit_on_the_cpu(tiny_csv):
    """``auto`` weighs the base at its unquantized size (4-bit layers at their original shape) and
    keeps NF4 on the CPU; ``true`` and ``false`` are obeyed; an unquantized base is left alone."""
    from trainables.models import dequantize_base_wanted, unquantized_bytes

    tr = _trainer(tiny_csv, "head")
    plain = RunConfig.model_validate(tiny_config(tiny_csv, quantization="none"))
    twin = Trainer(plain, load_dataset(plain.data), log=lambda *_: None)
    assert unquantized_bytes(tr.model) == unquantized_bytes(twin.model)
    cpu = torch.device("cpu")
    assert not tr.dequantized_base and _linear4bit_modules(tr.model)  # auto, on the CPU
    assert dequantize_base_wanted(True, "nf4", tr.model, cpu) and not dequantize_base_wanted(False, "nf4", tr.model, cpu)
    assert not dequantize_base_wanted(True, "none", twin.model, cpu)
