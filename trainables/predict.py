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


def read_model_folder(folder: str | Path) -> tuple[RunConfig, list[str], object]:
    """A model folder's run config, label names and tokenizer (checks the folder's layout)."""
    import yaml

    folder = Path(folder)
    missing = [r for r in L.REQUIRED if not (folder / r).exists()]
    if missing:
        raise InputError(f"{folder}: not a qlora-tune model folder (missing {', '.join(missing)})")
    cfg = RunConfig.model_validate(yaml.safe_load((folder / L.CONFIG).read_text()))
    label_names = json.loads((folder / L.LABELS).read_text())["names"]
    return cfg, label_names, load_tokenizer(folder / L.TOKENIZER, cfg.trust_remote_code)


def dequantized(base):
    """The base with its 4-bit (or 8-bit) layers replaced by plain linear layers holding the same
    weights in the compute dtype (transformers' ``dequantize``). On a GPU this is what bitsandbytes
    computes with anyway (it dequantizes to the compute dtype before each matmul), minus a
    dequantization per layer and call; it costs the memory of an unquantized base."""
    return base.dequantize() if getattr(base, "hf_quantizer", None) is not None else base


class Classifier:
    """A loaded classifier.

    ``merge=True`` (the default) serves from a dequantized base with the adapter folded in: one plain
    linear layer per projection, far fewer kernel launches per forward than the 4-bit base with a
    separate adapter, for the memory of an unquantized base. The weights are those training
    evaluated (exactly, in the CPU's float32; folding the adapter into bf16 weights on a GPU rounds
    them to bf16). ``merge=False`` keeps the 4-bit base and the separate adapter."""

    def __init__(self, folder: str | Path, dev: torch.device | None = None, merge: bool = True,
                 batch_size: int | None = None):
        self.folder = Path(folder)
        self.dev = dev or device()
        self.cfg, self.label_names, self.tokenizer = read_model_folder(self.folder)
        self.bf16 = use_bf16(self.cfg, self.dev)
        self.batch_size = batch_size or max(self.cfg.training.eval_batch_size, 64)
        self.approach = make_approach(self.tokenizer, self.label_names, self.cfg)
        base = load_base(self.cfg, resolve_model(self.cfg.model), len(self.label_names),
                         self.tokenizer.pad_token_id, self.dev)
        model = load_adapter(dequantized(base) if merge else base, self.folder / L.ADAPTER)
        if merge:
            model = model.merge_and_unload()
        self.model = model.eval()

    def predict(self, texts: list[str]) -> Prediction:
        return _predict(self.model, self.approach, self.label_names, texts, self.batch_size, self.dev, self.bf16)

    def generate(self, texts: list[str], max_new_tokens: int = 12) -> list[str]:
        """Free-text completion of each text's prompt (approaches that write text only)."""
        return self.approach.generate(self.model, list(texts), self.dev, max_new_tokens)


def _predict(model, approach, label_names: list[str], texts: list[str], batch_size: int, dev, bf16: bool) -> Prediction:
    if not texts:
        return Prediction([], np.zeros((0, len(label_names))), label_names)
    ex = approach.encode(list(texts))
    scores = batched_log_scores(model, approach, ex, batch_size, dev, bf16)
    probs = torch.softmax(scores, -1).numpy()
    return Prediction([label_names[i] for i in probs.argmax(1)], probs, label_names)


@dataclass
class _Version:
    name: str
    cfg: RunConfig
    label_names: list[str]
    approach: object
    base_key: tuple
    bf16: bool


class ClassifierSet:
    """Several trained classifiers (versions) in one process. Versions trained on the same base
    (model, approach, quantization, number of labels) share one loaded base (dequantized with ``merge``, else 4-bit), with each
    version's adapter attached under its name: serving a champion and a challenger costs one base.

    :meth:`predict_items` scores a batch that mixes versions (rows grouped by version, each group run
    with its adapter active); one batch at a time (adapters are switched on the shared model)."""

    def __init__(self, folders: dict[str, str | Path], dev: torch.device | None = None, batch_size: int = 64,
                 merge: bool = True):
        from peft import PeftModel

        if not folders:
            raise InputError("no model to serve")
        self.dev = dev or device()
        self.batch_size = batch_size
        self.versions: dict[str, _Version] = {}
        self.models: dict[tuple, object] = {}  # base key -> PeftModel holding its versions' adapters
        for name, folder in folders.items():
            cfg, label_names, tok = read_model_folder(folder)
            key = (cfg.model, cfg.approach, cfg.quantization, cfg.compute_dtype, len(label_names),
                   tok.pad_token_id, cfg.trust_remote_code)
            adapter = Path(folder) / L.ADAPTER
            if key not in self.models:
                base = load_base(cfg, resolve_model(cfg.model), len(label_names), tok.pad_token_id, self.dev)
                self.models[key] = load_adapter(dequantized(base) if merge else base, adapter, adapter_name=name).eval()
            else:
                model: PeftModel = self.models[key]
                model.load_adapter(str(adapter), adapter_name=name, is_trainable=False)
                model.eval()
            self.versions[name] = _Version(name, cfg, label_names, make_approach(tok, label_names, cfg), key,
                                           use_bf16(cfg, self.dev))
        self.active = {key: model.active_adapter for key, model in self.models.items()}
        if merge:  # a base that serves one version gets its adapter folded in (see Classifier)
            for key, model in list(self.models.items()):
                if sum(v.base_key == key for v in self.versions.values()) == 1:
                    self.models[key] = model.merge_and_unload().eval()

    def __contains__(self, name: str) -> bool:
        return name in self.versions

    def predict(self, texts: list[str], version: str) -> Prediction:
        v = self.versions[version]
        model = self.models[v.base_key]
        if self.active[v.base_key] != v.name:  # several versions on one base: switch adapters
            model.set_adapter(v.name)
            self.active[v.base_key] = v.name
        return _predict(model, v.approach, v.label_names, texts, self.batch_size, self.dev, v.bf16)

    def predict_items(self, items: list[tuple[str, str]]) -> list[dict]:
        """``[(version, text), ...]`` -> one record per item (``model``, ``label``, ``p_<label>``), in order."""
        out: list[dict | None] = [None] * len(items)
        by_version: dict[str, list[int]] = {}
        for i, (version, _) in enumerate(items):
            by_version.setdefault(version, []).append(i)
        for version, idx in by_version.items():
            for i, rec in zip(idx, self.predict([items[i][1] for i in idx], version).records()):
                out[i] = {"model": version, **rec}
        return out
