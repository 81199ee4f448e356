"""Classify with a trained output folder (adapter + tokenizer + labels + config)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainables import layout as L
from trainables.approaches import Example, autocast, batched_log_scores, make_approach, use_bf16
from trainables.config import RunConfig
from trainables.errors import InputError
from trainables.graphs import GraphedScorer
from trainables.models import (
    dequantized,
    device,
    load_adapter,
    load_base,
    load_tokenizer,
    lora_inputs_uncast,
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


class Classifier:
    """A loaded classifier.

    ``merge=True`` (the default) serves from a dequantized base with the adapter folded in: one plain
    linear layer per projection, far fewer kernel launches per forward than the 4-bit base with a
    separate adapter, for the memory of an unquantized base. The weights are those training
    evaluated (exactly, in the CPU's float32; folding the adapter into bf16 weights on a GPU rounds
    them to bf16). ``merge=False`` keeps the 4-bit base and the separate adapter."""

    def __init__(self, folder: str | Path, dev: torch.device | None = None, merge: bool = True,
                 batch_size: int | None = None, graphs: bool = True):
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
        self.model = model.eval().requires_grad_(False)
        self.scorer = graphed_scorer(self.model, self.approach, self.dev, self.bf16, self.batch_size) \
            if graphs and merge else None

    def predict(self, texts: list[str]) -> Prediction:
        return _predict(self.model, self.approach, self.label_names, texts, self.batch_size, self.dev, self.bf16,
                        self.scorer)

    def warmup(self) -> int:
        """Capture the CUDA graphs of every batch shape now (0 where graphs are not used)."""
        return warm(self.scorer, self.approach)

    def generate(self, texts: list[str], max_new_tokens: int = 12) -> list[str]:
        """Free-text completion of each text's prompt (approaches that write text only)."""
        return self.approach.generate(self.model, list(texts), self.dev, max_new_tokens)


def graphed_scorer(model, approach, dev: torch.device, bf16: bool, max_rows: int, pool=None) -> GraphedScorer | None:
    """The approach's scoring of ``model`` replayed from CUDA graphs, where that works: on a GPU, for
    an approach with ``static_scoring``, over plain (dequantized) weights. None elsewhere."""
    if dev.type != "cuda" or not approach.static_scoring:
        return None
    return GraphedScorer(unmasked_pass(model, approach), approach.tok.pad_token_id, max_rows, dev,
                         pool=pool, context=lambda: autocast(dev, bf16, cache=False))


def unmasked_pass(model, approach):
    """The approach's scoring pass over its right-padded batches without their padding mask: under
    causal attention no real token sees the padding to its right, so no real row's score changes, and
    attention takes its plain causal kernel (no mask to build; nothing in transformers' mask logic
    that reads the mask on the host, which graph capture forbids)."""
    return lambda batch: approach.log_scores(model, {**batch, "attention_mask": None})


def warm(scorer: GraphedScorer | None, approach) -> int:
    """Capture ``scorer``'s graphs for every batch shape up to its rows and the approach's longest input."""
    if scorer is None:
        return 0
    pad = approach.tok.pad_token_id
    longest = max(len(e.input_ids) for e in approach.encode(["x " * approach.max_length]))
    return scorer.warmup(longest, lambda rows, n: approach.collate([Example([pad] * n, 0, n)] * rows, train=False))


def _predict(model, approach, label_names: list[str], texts: list[str], batch_size: int, dev, bf16: bool,
             scorer=None) -> Prediction:
    if not texts:
        return Prediction([], np.zeros((0, len(label_names))), label_names)
    ex = approach.encode(list(texts))
    scores = batched_log_scores(model, approach, ex, batch_size, dev, bf16, scorer)
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
    scorer: GraphedScorer | None = None


class ClassifierSet:
    """Several trained classifiers (versions) in one process. Versions trained on the same base
    (model, approach, quantization, number of labels) share one loaded base (dequantized with ``merge``, else 4-bit), with each
    version's adapter attached under its name: serving a champion and a challenger costs one base.

    :meth:`predict_items` scores a batch that mixes versions (rows grouped by version, each group run
    with its adapter active); one batch at a time (adapters are switched on the shared model)."""

    def __init__(self, folders: dict[str, str | Path], dev: torch.device | None = None, batch_size: int = 64,
                 merge: bool = True, graphs: bool = True):
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
        for key, model in self.models.items():  # the flag is per LoRA layer, shared by the adapters in it
            if all(v.bf16 for v in self.versions.values() if v.base_key == key):
                lora_inputs_uncast(model)
        self.active = {key: model.active_adapter for key, model in self.models.items()}
        if merge:  # a base that serves one version gets its adapter folded in (see Classifier)
            for key, model in list(self.models.items()):
                if sum(v.base_key == key for v in self.versions.values()) == 1:
                    self.models[key] = model.merge_and_unload().eval()
        for model in self.models.values():
            model.requires_grad_(False)
        if graphs and merge and self.dev.type == "cuda":  # graphs per version: each captures its adapter
            pool = torch.cuda.graph_pool_handle()
            for v in self.versions.values():
                v.scorer = graphed_scorer(self.models[v.base_key], v.approach, self.dev, v.bf16, batch_size, pool)

    def __contains__(self, name: str) -> bool:
        return name in self.versions

    def _activate(self, v: _Version):
        model = self.models[v.base_key]
        if self.active[v.base_key] != v.name:  # several versions on one base: switch adapters
            model.set_adapter(v.name)
            self.active[v.base_key] = v.name
        return model

    def predict(self, texts: list[str], version: str) -> Prediction:
        v = self.versions[version]
        return _predict(self._activate(v), v.approach, v.label_names, texts, self.batch_size, self.dev, v.bf16,
                        v.scorer)

    def warmup(self) -> int:
        """Capture every version's CUDA graphs now (a server does this before taking requests)."""
        total = 0
        for v in self.versions.values():
            self._activate(v)
            total += warm(v.scorer, v.approach)
        return total

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
