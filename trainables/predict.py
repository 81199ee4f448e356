"""Classify with a trained output folder (adapter + tokenizer + labels + config)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainables import layout as L
from trainables.approaches import batched_log_scores, make_approach, use_bf16
from trainables.config import RunConfig
from trainables.errors import InputError
from trainables.models import (
    device,
    load_adapter,
    load_base,
    load_tokenizer,
    resolve_model,
)


@dataclass
class Prediction:
    labels: list[str]
    probabilities: np.ndarray  # [N, classes]
    label_names: list[str]

    def records(self) -> list[dict]:
        return [{"label": lab, **{f"p_{n}": float(p) for n, p in zip(self.label_names, row)}}
                for lab, row in zip(self.labels, self.probabilities)]


class Classifier:
    """A loaded classifier. ``merge=True`` folds LoRA into an unquantized base for speed."""

    def __init__(self, folder: str | Path, dev: torch.device | None = None, merge: bool = True,
                 batch_size: int | None = None):
        import yaml

        folder = Path(folder)
        missing = [r for r in L.REQUIRED if not (folder / r).exists()]
        if missing:
            raise InputError(f"{folder}: not a qlora-tune model folder (missing {', '.join(missing)})")
        self.folder = folder
        self.cfg = RunConfig.model_validate(yaml.safe_load((folder / L.CONFIG).read_text()))
        self.label_names = json.loads((folder / L.LABELS).read_text())["names"]
        self.dev = dev or device()
        self.bf16 = use_bf16(self.cfg, self.dev)
        self.batch_size = batch_size or max(self.cfg.training.eval_batch_size, 64)
        self.tokenizer = load_tokenizer(folder / L.TOKENIZER, self.cfg.trust_remote_code)
        self.approach = make_approach(self.tokenizer, self.label_names, self.cfg)
        base = load_base(self.cfg, resolve_model(self.cfg.model), len(self.label_names),
                         self.tokenizer.pad_token_id, self.dev)
        model = load_adapter(base, folder / L.ADAPTER)
        if merge and self.cfg.quantization == "none":
            model = model.merge_and_unload()
        self.model = model.eval()

    def predict(self, texts: list[str]) -> Prediction:
        if not texts:
            return Prediction([], np.zeros((0, len(self.label_names))), self.label_names)
        ex = self.approach.encode(list(texts))
        scores = batched_log_scores(self.model, self.approach, ex, self.batch_size, self.dev, self.bf16)
        probs = torch.softmax(scores, -1).numpy()
        return Prediction([self.label_names[i] for i in probs.argmax(1)], probs, self.label_names)

    def generate(self, texts: list[str], max_new_tokens: int = 12) -> list[str]:
        """Free-text completion of each text's prompt (approaches that write text only)."""
        return self.approach.generate(self.model, list(texts), self.dev, max_new_tokens)
