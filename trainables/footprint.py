"""A trial's GPU memory, measured: one short fit (training steps and evaluations) at given settings,
on synthetic texts whose lengths reach every length bucket a real trial's batches can fall in, up to
``training.max_length``: so the fit captures every CUDA graph a real trial would, and holds their pools."""

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
    base_bytes: int = 0
    """The quantized base's bytes: a reused worker (``reuse_actors``) keeps a pristine copy of it
    per approach, besides what a trial holds."""


BATCHES_PER_BUCKET = 3
"""Training batches per length bucket: warmed up eagerly, then captured and replayed (trainables.step_graphs)."""


def probe_words(max_length: int) -> list[int]:
    """Word counts of the fit's probe texts, 1 to ``max_length``: every count up to 256 (the buckets
    16 tokens wide lie below 64 tokens), then 5% apart (the buckets above are a third wide or more),
    so that every bucket the encoding reaches gets a probe, with a few hundred at most."""
    ks = list(range(1, min(max_length, 256) + 1))
    while ks[-1] < max_length:
        ks.append(min(max_length, int(ks[-1] * 1.05) + 1))
    return ks


def synthetic_data(cfg, label_names: list[str]):
    """A data set for ``cfg``'s footprint fit: :data:`BATCHES_PER_BUCKET` training batches per length
    bucket (:func:`trainables.graphs.bucket_length`) that the approach's encoding of texts of 1 to
    ``training.max_length`` words (:func:`probe_words`) reaches; evaluation at the longest, one full batch and a partial one
    (a second scoring graph, as a real split's last batch makes)."""
    from trainables.approaches import make_approach
    from trainables.data import Dataset, Split
    from trainables.graphs import bucket_length
    from trainables.models import load_tokenizer, resolve_model

    t = cfg.training
    tok = load_tokenizer(resolve_model(cfg.model), cfg.trust_remote_code, reuse=True)
    approach = make_approach(tok, label_names, cfg)
    probes = [" ".join(["word"] * k) for k in probe_words(t.max_length)]
    lengths = [len(e.input_ids) for e in approach.training_examples(approach.encode(probes, [0] * len(probes)))]
    longest = {}  # bucket -> the longest probe in it
    for text, n in zip(probes, lengths):
        longest[bucket_length(n)] = text
    texts = list(longest.values())

    def split(rows: list[str]):
        return Split(rows, [i % len(label_names) for i in range(len(rows))])

    train = [x for x in texts for _ in range(BATCHES_PER_BUCKET * t.batch_size)]
    return Dataset(label_names, split(train), split([texts[-1]] * (t.eval_batch_size + max(1, t.eval_batch_size // 2 - 1))))


def measure(run_config: dict, label_names: list[str]) -> Footprint:
    """Fit ``run_config`` (a RunConfig's JSON) for one epoch of :func:`synthetic_data` on the current GPU."""
    import gc

    import torch

    from trainables.config import RunConfig
    from trainables.loop import Trainer

    cfg = RunConfig.model_validate(run_config)
    cfg.training.epochs = 1
    cfg.training.epoch_examples = None
    dev = torch.device("cuda")
    data = synthetic_data(cfg, label_names)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_reserved(dev)
    trainer = Trainer(cfg, data, dev=dev, log=lambda *_: None, every_bucket=True)
    trainer.fit()
    peak = torch.cuda.max_memory_reserved(dev) - before
    base_bytes = trainer.base_bytes
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    return Footprint(int(peak), int(torch.cuda.get_device_properties(dev).total_memory), int(base_bytes))


def measure_each(run_configs: list[dict], label_names: list[str]) -> list[Footprint]:
    """:func:`measure` for each run config, one after another in this process (a fresh process spends
    far longer starting and importing torch and transformers than the fits take)."""
    return [measure(cfg, label_names) for cfg in run_configs]
