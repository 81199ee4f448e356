"""The two ways to fine-tune a classifier, behind one interface the loop and the predictor share.

* :class:`HeadApproach` - LlamaForSequenceClassification: a linear ``score`` layer on the last
  non-pad token, cross-entropy with optional class weights.
* :class:`GenerationApproach` - a causal LM trained on ``prompt + label`` with the loss on the label
  tokens only; prediction scores every label's token sequence after the prompt, so the answer is
  always in the label set and each label gets a probability.

Both return *log-scores* ``[batch, classes]``; ``softmax`` of them is the per-label probability.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainables.config import RunConfig
from trainables.errors import InputError


@dataclass
class Example:
    input_ids: list[int]
    label: int = -1
    prompt_len: int = 0


def _pad(seqs: list[list[int]], pad_id: int, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence, rounded up to ``multiple`` (fewer distinct shapes)."""
    width = -(-max(len(s) for s in seqs) // multiple) * multiple
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


class Approach:
    name: str

    def __init__(self, tokenizer, label_names: list[str], cfg: RunConfig):
        self.tok = tokenizer
        self.labels = label_names
        self.cfg = cfg
        self.max_length = cfg.training.max_length
        self.pad_multiple = cfg.training.pad_to_multiple_of

    def _tokenize(self, texts: list[str], max_length: int | None) -> list[list[int]]:
        enc = self.tok(texts, add_special_tokens=False, truncation=max_length is not None,
                       max_length=max_length)
        return enc["input_ids"]

    def encoding_key(self) -> tuple:
        """Everything besides the tokenizer and the texts that shapes :meth:`encode`'s output."""
        return (self.name, self.max_length)

    # interface
    def encode(self, texts: list[str], labels: list[int] | None = None) -> list[Example]:
        """Examples to score (and, through :meth:`training_examples`, to train on)."""
        raise NotImplementedError

    def training_examples(self, examples: list[Example]) -> list[Example]:
        """What training feeds the model for labelled ``examples`` from :meth:`encode`."""
        return examples

    def collate(self, batch: list[Example], train: bool) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model, batch: dict[str, torch.Tensor], class_weights: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def log_scores(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class HeadApproach(Approach):
    name = "head"

    def encode(self, texts, labels=None):
        ids = self._tokenize(texts, self.max_length)
        labels = labels if labels is not None else [-1] * len(texts)
        return [Example(i, y) for i, y in zip(ids, labels)]

    def collate(self, batch, train):
        ids, mask = _pad([e.input_ids for e in batch], self.tok.pad_token_id, self.pad_multiple)
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([e.label for e in batch], dtype=torch.long)}

    def log_scores(self, model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits.float()

    def loss(self, model, batch, class_weights):
        return F.cross_entropy(self.log_scores(model, batch), batch["labels"], weight=class_weights)


def _causal_parts(model):
    """(decoder, lm_head) of a causal LM, through any PEFT wrapping."""
    return model.get_decoder(), model.get_output_embeddings()


class GenerationApproach(Approach):
    name = "generation"

    def __init__(self, tokenizer, label_names, cfg):
        super().__init__(tokenizer, label_names, cfg)
        if tokenizer.eos_token_id is None:
            raise InputError(f"model '{cfg.model}': tokenizer has no end-of-sequence token, needed by approach=generation")
        template = cfg.generation.prompt_template
        prefix, suffix = template.split("{text}")
        fill = ", ".join(label_names)
        self.prefix = self._tokenize([prefix.replace("{labels}", fill)], None)[0] if prefix else []
        self.suffix = self._tokenize([suffix.replace("{labels}", fill)], None)[0] if suffix else []
        sep = "" if template[-1:].isspace() else " "
        self.label_ids = [ids + [tokenizer.eos_token_id] for ids in self._tokenize([sep + n for n in label_names], None)]
        firsts = [ids[0] for ids in self.label_ids]
        distinct = len(set(firsts)) == len(firsts)
        mode = cfg.generation.scoring
        if mode == "first_token" and not distinct:
            raise InputError("generation.scoring: first_token needs labels whose first tokens differ; use 'full'")
        self.first_token = mode == "first_token" or (mode == "auto" and distinct)
        self.first_ids = torch.tensor(firsts, dtype=torch.long)
        self.text_budget = self.max_length - len(self.prefix) - len(self.suffix) - max(map(len, self.label_ids))
        if self.text_budget < 4:
            raise InputError(
                f"training.max_length: {self.max_length} tokens leave no room for the text after the prompt "
                f"template ({len(self.prefix) + len(self.suffix)} tokens) and the longest label"
            )

    def encoding_key(self):
        return (self.name, self.text_budget, tuple(self.prefix), tuple(self.suffix), tuple(map(tuple, self.label_ids)))

    def prompt_ids(self, texts: list[str]) -> list[list[int]]:
        return [self.prefix + t + self.suffix for t in self._tokenize(texts, self.text_budget)]

    def encode(self, texts, labels=None):
        prompts = self.prompt_ids(texts)
        labels = labels if labels is not None else [-1] * len(texts)
        return [Example(p, y, len(p)) for p, y in zip(prompts, labels)]

    def training_examples(self, examples):
        """The prompt followed by its label's tokens (the loss falls on those only)."""
        return [Example(e.input_ids + self.label_ids[e.label], e.label, e.prompt_len) for e in examples]

    def collate(self, batch, train):
        if train or not self.first_token:
            # one row per (example, label) when scoring in full; one row per example when training
            rows, plens, owners = [], [], []
            for i, e in enumerate(batch):
                if train:
                    rows.append(e.input_ids); plens.append(e.prompt_len); owners.append(i)
                else:
                    for lab in self.label_ids:
                        rows.append(e.input_ids + lab); plens.append(e.prompt_len); owners.append(i)
            ids, mask = _pad(rows, self.tok.pad_token_id, self.pad_multiple)
            targets = torch.full_like(ids, -100)
            for r, (seq, pl) in enumerate(zip(rows, plens)):
                targets[r, pl: len(seq)] = ids[r, pl: len(seq)]
            return {"input_ids": ids, "attention_mask": mask, "targets": targets,
                    "labels": torch.tensor([e.label for e in batch], dtype=torch.long)}
        ids, mask = _pad([e.input_ids for e in batch], self.tok.pad_token_id, self.pad_multiple)
        return {"input_ids": ids, "attention_mask": mask,
                "last": torch.tensor([e.prompt_len - 1 for e in batch], dtype=torch.long),
                "labels": torch.tensor([e.label for e in batch], dtype=torch.long)}

    def _token_logits(self, model, batch):
        """Logits only where a label token is predicted: the full-vocabulary projection of every
        position is skipped (it dominates compute and memory for short classifiers)."""
        decoder, lm_head = _causal_parts(model)
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        tgt = batch["targets"][:, 1:]
        sel = tgt != -100
        logits = lm_head(hidden[:, :-1][sel]).float()
        return logits, tgt[sel], sel

    def loss(self, model, batch, class_weights):
        logits, tgt, _ = self._token_logits(model, batch)
        return F.cross_entropy(logits, tgt)

    def log_scores(self, model, batch):
        if self.first_token:
            decoder, lm_head = _causal_parts(model)
            hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            h = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch["last"]]
            logits = lm_head(h).float()
            return torch.log_softmax(logits, -1)[:, self.first_ids.to(logits.device)]
        logits, tgt, sel = self._token_logits(model, batch)
        tok_lp = torch.log_softmax(logits, -1).gather(1, tgt[:, None]).squeeze(1)
        row_of = torch.arange(sel.shape[0], device=sel.device)[:, None].expand_as(sel)[sel]
        per_row = torch.zeros(sel.shape[0], device=tok_lp.device).index_add_(0, row_of, tok_lp)
        return per_row.view(-1, len(self.labels))


def make_approach(tokenizer, label_names: list[str], cfg: RunConfig) -> Approach:
    cls = HeadApproach if cfg.approach == "head" else GenerationApproach
    return cls(tokenizer, label_names, cfg)


def to_device(batch: dict[str, torch.Tensor], dev: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}


def use_bf16(cfg: RunConfig, dev: torch.device) -> bool:
    """``training.bf16``: ``auto`` is bf16 autocast on CUDA only (training and prediction alike)."""
    return dev.type == "cuda" if cfg.training.bf16 == "auto" else bool(cfg.training.bf16)


def autocast(dev: torch.device, bf16: bool):
    """bf16 autocast where asked (the default on CUDA); a no-op context otherwise."""
    import contextlib

    return torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@torch.inference_mode()
def batched_log_scores(model, approach: Approach, examples: list[Example], batch_size: int,
                       dev: torch.device, bf16: bool) -> torch.Tensor:
    """Log-scores ``[N, classes]`` in input order (on the CPU).

    Examples are run longest first in large batches (little padding), then put back in order."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    out = torch.empty((len(examples), len(approach.labels)), dtype=torch.float32)
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        batch = to_device(approach.collate([examples[i] for i in idx], train=False), dev)
        with autocast(dev, bf16):
            out[idx] = approach.log_scores(model, batch).float().cpu()
    return out


def decision_loss(scores: torch.Tensor, labels: list[int], class_weights: torch.Tensor | None = None) -> float:
    """The loss of the classification decision: cross-entropy over the label set (NaN without labels)."""
    if not labels or min(labels) < 0:
        return float("nan")
    w = class_weights.cpu() if class_weights is not None else None
    return float(F.cross_entropy(scores, torch.tensor(labels), weight=w, reduction="sum")) / len(labels)
