"""Classification head: LlamaForSequenceClassification, a linear ``score`` layer on the last non-pad
token, cross-entropy with optional balanced class weights."""

from __future__ import annotations

from typing import Literal

import numpy as np

from trainables.approaches.base import Approach, Example
from trainables.strict import Strict


class HeadSettings(Strict):
    class_weights: Literal["none", "balanced"] = "none"
    """``balanced`` weighs each class's loss by the inverse of its share of the training split."""


class HeadApproach(Approach):
    name = "head"
    rank = 0
    Settings = HeadSettings
    task_type = "SEQ_CLS"
    static_scoring = True
    keep_unquantized = ["score"]  # the fresh head trains in full precision
    default_search = {"head.class_weights": {"choice": ["none", "balanced"]}}

    @classmethod
    def load_pretrained(cls, path, num_labels: int, pad_token_id: int, **kw):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, pad_token_id=pad_token_id, **kw)

    @classmethod
    def init_weights(cls, model, generator) -> None:
        """The head peft trains (its copy of ``score``, a module to save): normal, the model's
        ``initializer_range`` wide."""
        import torch

        score = model.get_base_model().score
        score = score.modules_to_save[model.active_adapter] if hasattr(score, "modules_to_save") else score
        w = torch.empty(score.weight.shape, dtype=torch.float32)
        with torch.no_grad():
            score.weight.copy_(torch.nn.init.normal_(w, std=getattr(model.config, "initializer_range", 0.02),
                                                     generator=generator))

    def encode(self, texts, labels=None):
        ids = self._tokenize(texts, self.max_length)
        labels = labels if labels is not None else [-1] * len(texts)
        return [Example(i, y) for i, y in zip(ids, labels)]

    def collate(self, batch, train):
        import torch

        ids, mask = self._pad([e.input_ids for e in batch])
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([e.label for e in batch], dtype=torch.long)}

    def class_weights(self, train_labels):
        import torch

        if self.settings.class_weights == "none":
            return None
        counts = np.bincount(train_labels, minlength=len(self.labels)).astype(float)
        return torch.tensor(len(train_labels) / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32)

    def log_scores(self, model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return out.logits.float()

    def loss(self, model, batch, class_weights):
        import torch.nn.functional as F

        return F.cross_entropy(self.log_scores(model, batch), batch["labels"], weight=class_weights)
