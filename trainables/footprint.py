"""A trial's GPU memory, measured: one short fit (training steps and an evaluation) at given settings,
on synthetic texts long enough to fill ``training.max_length``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Footprint:
    peak_bytes: int
    """Most memory the fit held from the device at once (``torch.cuda.max_memory_reserved``): its
    tensors, and what the allocator keeps cached beside them and in CUDA graphs' pools, which a
    trial's process holds as much as its tensors."""
    card_bytes: int
    """The card's memory."""


def measure(run_config: dict, label_names: list[str]) -> Footprint:
    """Fit ``run_config`` (a RunConfig's JSON) for one epoch of two batches on the current GPU."""
    import gc

    import torch

    from trainables.config import RunConfig
    from trainables.data import Dataset, Split
    from trainables.loop import Trainer

    cfg = RunConfig.model_validate(run_config)
    cfg.training.epochs = 1
    dev = torch.device("cuda")
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_reserved(dev)
    t = cfg.training
    text = " ".join(["word"] * 2 * t.max_length)  # at least max_length tokens in any tokenizer: truncated to it
    n = 2 * t.batch_size
    labels = [i % len(label_names) for i in range(max(n, t.eval_batch_size))]
    data = Dataset(label_names, Split([text] * n, labels[:n]), Split([text] * t.eval_batch_size, labels[:t.eval_batch_size]))
    trainer = Trainer(cfg, data, dev=dev, log=lambda *_: None)
    trainer.fit()
    peak = torch.cuda.max_memory_reserved(dev) - before
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    return Footprint(int(peak), int(torch.cuda.get_device_properties(dev).total_memory))


def measure_each(run_configs: list[dict], label_names: list[str]) -> list[Footprint]:
    """:func:`measure` for each run config, one after another in this process (a fresh process spends
    far longer starting and importing torch and transformers than the fits take)."""
    return [measure(cfg, label_names) for cfg in run_configs]
