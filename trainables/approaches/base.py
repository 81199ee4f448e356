"""What every approach provides, and the helpers the training loop and the predictor share.

Approach modules import torch inside the functions that use it: the run config reads every approach's
settings, and the CLI and a study's driver read the config without loading torch (seconds of a
study's start).

An approach is one way to turn a Llama model into a classifier. Its class says how the base is loaded
(:meth:`Approach.load_pretrained`, the modules kept out of quantization, the PEFT task type), how texts
become examples and batches, its training loss and its scoring. Scores are *log-scores*
``[batch, classes]``; ``softmax`` of them is the per-label probability.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from trainables.errors import InputError
from trainables.strict import Strict

IGNORE = -100
"""The target of a padded row or label position (:meth:`Approach.pad_to`): no loss (PyTorch's
``cross_entropy`` default ``ignore_index``)."""

if TYPE_CHECKING:
    import torch

    from trainables.config import RunConfig


@dataclass
class Example:
    input_ids: list[int]
    label: int = -1
    prompt_len: int = 0


class Approach:
    """One way to fine-tune a classifier. Subclasses live one per module in this package."""

    name: ClassVar[str]
    """The value of ``approach`` in a config; also the config key of :attr:`Settings`."""
    rank: ClassVar[int] = 100
    """Order among approaches (the default approach, and the first trials of a study, come first)."""
    Settings: ClassVar[type[Strict]] = Strict
    """The approach's own settings, at ``<name>:`` in a run config."""
    task_type: ClassVar[str] = "CAUSAL_LM"
    """PEFT's task type for the LoRA adapter."""
    keep_unquantized: ClassVar[list[str]] = []
    """Modules the quantized base keeps in full precision (a freshly initialised head)."""
    default_search: ClassVar[dict[str, Any]] = {}
    """The approach's block of the default search space (dotted keys into its settings)."""

    def __init__(self, tokenizer, label_names: list[str], cfg: RunConfig):
        self.tok = tokenizer
        self.labels = label_names
        self.cfg = cfg
        self.settings = getattr(cfg, self.name)
        self.max_length = cfg.training.max_length
        self.pad_multiple = cfg.training.pad_to_multiple_of

    # ---------------------------------------------------------------- the model

    @classmethod
    def load_pretrained(cls, path, num_labels: int, pad_token_id: int, **kw):
        """The base model from a local folder (``kw``: dtype, quantization, device map)."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, **kw)

    @classmethod
    def init_weights(cls, model, generator: torch.Generator) -> None:
        """Give the trainable weights of ``model`` (LoRA attached) that are not LoRA's their starting
        values, drawn from ``generator``. Nothing by default."""

    # ---------------------------------------------------------------- data

    def _tokenize(self, texts: list[str], max_length: int | None) -> list[list[int]]:
        enc = self.tok(texts, add_special_tokens=False, truncation=max_length is not None,
                       max_length=max_length)
        return enc["input_ids"]

    def _pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to the longest sequence, rounded up to ``pad_to_multiple_of`` (fewer shapes):
        ``input_ids`` and ``attention_mask`` as the tokenizer's ``pad`` makes them, in a tenth of its
        time (it runs for every batch, on the host, between the GPU's steps)."""
        import torch

        lengths = np.fromiter(map(len, seqs), np.int64, len(seqs))
        multiple = self.pad_multiple or 1
        width = -(-int(lengths.max(initial=0)) // multiple) * multiple
        mask = np.arange(width)[None, :] < lengths[:, None]
        ids = np.full(mask.shape, self.tok.pad_token_id, np.int64)
        ids[mask] = np.fromiter(itertools.chain.from_iterable(seqs), np.int64, int(lengths.sum()))
        return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))

    def encoding_key(self) -> tuple:
        """Everything besides the tokenizer and the texts that shapes :meth:`encode`'s output."""
        return (self.name, self.max_length)

    def encode(self, texts: list[str], labels: list[int] | None = None) -> list[Example]:
        """Examples to score (and, through :meth:`training_examples`, to train on)."""
        raise NotImplementedError

    def training_examples(self, examples: list[Example]) -> list[Example]:
        """What training feeds the model for labelled ``examples`` from :meth:`encode`."""
        return examples

    def collate(self, batch: list[Example], train: bool) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def pad_to(self, batch: dict[str, torch.Tensor], rows: int, length: int) -> dict[str, torch.Tensor]:
        """A training batch (from :meth:`collate`) padded to ``rows`` x ``length``, with the same loss:
        extra columns are right padding (pad tokens, masked out), which causal attention keeps every
        real token from seeing; extra rows are pad tokens (the first one visible) whose label is
        :data:`IGNORE`, so no loss.
        The batch's shapes then depend on ``rows`` and ``length`` only (one CUDA graph per length
        bucket, :mod:`trainables.step_graphs`)."""
        import torch.nn.functional as F

        ids, mask = batch["input_ids"], batch["attention_mask"]
        down, right = rows - ids.shape[0], length - ids.shape[1]
        if down <= 0 and right <= 0:
            return batch
        down, right = max(0, down), max(0, right)
        out = {**batch, "input_ids": F.pad(ids, (0, right, 0, down), value=self.tok.pad_token_id),
               "attention_mask": F.pad(mask, (0, right, 0, down), value=0)}
        out["attention_mask"][ids.shape[0]:, 0] = 1  # filler rows: one visible pad token (no empty softmax)
        if "labels" in batch:
            out["labels"] = F.pad(batch["labels"], (0, down), value=IGNORE)
        return out

    # ---------------------------------------------------------------- training and scoring

    def class_weights(self, train_labels: list[int]) -> torch.Tensor | None:
        """Per-class weights of the loss (None: unweighted)."""
        return None

    def loss(self, model, batch: dict[str, torch.Tensor], class_weights: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def log_scores(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    can_generate: ClassVar[bool] = False
    static_scoring: bool = False
    """:meth:`log_scores` keeps every shape fixed by its batch's and never waits on the device, so a
    CUDA graph can capture it (:mod:`trainables.graphs`)."""

    def generate(self, model, texts: list[str], dev: torch.device, max_new_tokens: int) -> list[str]:
        raise InputError(f"--generate: approach {self.name} does not write text; use a generation model")


# -------------------------------------------------------------------- shared helpers


def to_device(batch: dict[str, torch.Tensor], dev: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}


def use_bf16(cfg: RunConfig, dev: torch.device) -> bool:
    """``training.bf16``: ``auto`` is bf16 autocast on CUDA only (training and prediction alike)."""
    return dev.type == "cuda" if cfg.training.bf16 == "auto" else bool(cfg.training.bf16)


def autocast(dev: torch.device, bf16: bool, cache: bool = True):
    """bf16 autocast where asked (the default on CUDA); a no-op context otherwise. ``cache=False``
    for CUDA-graph capture (a cached cast would be freed at exit while the graph still reads it)."""
    import torch

    return torch.autocast(dev.type, dtype=torch.bfloat16, cache_enabled=cache) if bf16 else contextlib.nullcontext()


def batched_log_scores(model, approach: Approach, examples: list[Example], batch_size: int,
                       dev: torch.device, bf16: bool, scorer=None) -> torch.Tensor:
    """Log-scores ``[N, classes]`` in input order (on the CPU), in inference mode.

    Examples are run longest first in large batches (little padding), then put back in order.
    ``scorer(batch)`` (a CPU batch, under its own autocast) replaces ``approach.log_scores(model, batch)``
    (e.g. a :class:`trainables.graphs.GraphedScorer`)."""
    import torch

    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    with torch.inference_mode():
        out = torch.empty((len(examples), len(approach.labels)), dtype=torch.float32)
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            batch = approach.collate([examples[i] for i in idx], train=False)
            if scorer is not None:
                scores = scorer(batch)
            else:
                with autocast(dev, bf16):
                    scores = approach.log_scores(model, to_device(batch, dev))
            out[idx] = scores.float().cpu()
    return out


def decision_loss(scores: torch.Tensor, labels: list[int], class_weights: torch.Tensor | None = None) -> float:
    """The loss of the classification decision: cross-entropy over the label set (NaN without labels)."""
    import torch
    import torch.nn.functional as F

    if not labels or min(labels) < 0:
        return float("nan")
    w = class_weights.cpu() if class_weights is not None else None
    return float(F.cross_entropy(scores, torch.tensor(labels), weight=w, reduction="sum")) / len(labels)
