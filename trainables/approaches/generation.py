"""Generation: a causal LM trained on ``prompt + label`` with the loss on the label tokens only.
Prediction scores every label's token sequence after the prompt, so the answer is always in the label
set and each label gets a probability."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import field_validator

from trainables.approaches.base import IGNORE, Approach, Example
from trainables.errors import InputError
from trainables.strict import Strict

if TYPE_CHECKING:
    import torch

DEFAULT_PROMPT = (
    "Classify the text into one of these labels: {labels}.\n"
    "Text: {text}\n"
    "Label:"
)


class GenerationSettings(Strict):
    prompt_template: str = DEFAULT_PROMPT
    scoring: Literal["auto", "full", "first_token"] = "auto"
    """``full`` sums the log-probabilities of every label token (and the end token); ``first_token``
    reads one distribution after the prompt and needs labels whose first tokens differ; ``auto``
    picks ``first_token`` when that holds."""

    @field_validator("prompt_template")
    @classmethod
    def _one_text_slot(cls, v: str) -> str:
        if v.count("{text}") != 1:
            raise ValueError("must contain '{text}' exactly once")
        try:
            v.replace("{text}", "").format(labels="x")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"only '{{text}}' and '{{labels}}' may appear in braces ({e})") from None
        return v


def _causal_parts(model):
    """(decoder, lm_head) of a causal LM, through any PEFT wrapping."""
    return model.get_decoder(), model.get_output_embeddings()


class GenerationApproach(Approach):
    name = "generation"
    rank = 1
    Settings = GenerationSettings
    task_type = "CAUSAL_LM"
    can_generate = True

    def __init__(self, tokenizer, label_names, cfg):
        import torch

        super().__init__(tokenizer, label_names, cfg)
        if tokenizer.eos_token_id is None:
            raise InputError(f"model '{cfg.model}': tokenizer has no end-of-sequence token, needed by approach=generation")
        template = self.settings.prompt_template
        prefix, suffix = template.split("{text}")
        fill = ", ".join(label_names)
        self.prefix = self._tokenize([prefix.replace("{labels}", fill)], None)[0] if prefix else []
        self.suffix = self._tokenize([suffix.replace("{labels}", fill)], None)[0] if suffix else []
        sep = "" if template[-1:].isspace() else " "
        self.label_ids = [ids + [tokenizer.eos_token_id] for ids in self._tokenize([sep + n for n in label_names], None)]
        firsts = [ids[0] for ids in self.label_ids]
        distinct = len(set(firsts)) == len(firsts)
        mode = self.settings.scoring
        if mode == "first_token" and not distinct:
            raise InputError("generation.scoring: first_token needs labels whose first tokens differ; use 'full'")
        self.first_token = mode == "first_token" or (mode == "auto" and distinct)
        self.static_scoring = self.first_token  # full scoring selects label positions by value
        self._first_ids = {"cpu": torch.tensor(firsts, dtype=torch.long)}
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
        import torch

        labels = torch.tensor([e.label for e in batch], dtype=torch.long)
        if not train and self.first_token:  # one row per example, read after its prompt
            ids, mask = self._pad([e.input_ids for e in batch])
            return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                    "last": torch.tensor([e.prompt_len - 1 for e in batch], dtype=torch.long)}
        # training: one row per example; scoring in full: one row per (example, label)
        rows = [(e.input_ids, e.prompt_len) for e in batch] if train else \
            [(e.input_ids + lab, e.prompt_len) for e in batch for lab in self.label_ids]
        ids, mask = self._pad([r for r, _ in rows])
        # the label tokens, as positions into the flattened [rows, length - 1] predictions: found
        # here on the CPU, so the model's pass never waits on the GPU to find them
        length = ids.shape[1] - 1
        pos = [(r, p, seq[p + 1]) for r, (seq, pl) in enumerate(rows) for p in range(pl - 1, len(seq) - 1)]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "target_pos": torch.tensor([r * length + p for r, p, _ in pos], dtype=torch.long),
                "target_ids": torch.tensor([t for _, _, t in pos], dtype=torch.long),
                "target_row": torch.tensor([r for r, _, _ in pos], dtype=torch.long)}

    def pad_to(self, batch, rows, length):
        """As :meth:`Approach.pad_to`, with the label positions moved to the new row length and
        padded to a fixed count (``rows`` x the longest label; the extra targets are ignored)."""
        import torch.nn.functional as F

        old = batch["input_ids"].shape[1] - 1
        out = dict(super().pad_to(batch, rows, length))
        length = out["input_ids"].shape[1]
        pos = batch["target_pos"]
        fill = out["input_ids"].shape[0] * max(map(len, self.label_ids)) - len(pos)
        out["target_pos"] = F.pad((pos // old) * (length - 1) + pos % old, (0, fill), value=0)
        out["target_ids"] = F.pad(batch["target_ids"], (0, fill), value=IGNORE)
        out["target_row"] = F.pad(batch["target_row"], (0, fill), value=0)
        return out

    def _token_logits(self, model, batch):
        """Logits only where a label token is predicted: the full-vocabulary projection of every
        position is skipped (it dominates compute and memory for short classifiers)."""
        decoder, lm_head = _causal_parts(model)
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         use_cache=False).last_hidden_state
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, batch["target_pos"])
        return lm_head(h).float(), batch["target_ids"]

    def loss(self, model, batch, class_weights):
        import torch.nn.functional as F

        logits, tgt = self._token_logits(model, batch)
        return F.cross_entropy(logits, tgt, ignore_index=IGNORE)

    def _first_ids_on(self, dev: torch.device) -> torch.Tensor:
        """The labels' first token ids on ``dev``, copied there once (no copy inside a CUDA graph)."""
        if str(dev) not in self._first_ids:
            self._first_ids[str(dev)] = self._first_ids["cpu"].to(dev)
        return self._first_ids[str(dev)]

    def log_scores(self, model, batch):
        import torch

        if self.first_token:
            decoder, lm_head = _causal_parts(model)
            hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             use_cache=False).last_hidden_state
            h = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch["last"]]
            logits = lm_head(h).float()
            return torch.log_softmax(logits, -1)[:, self._first_ids_on(logits.device)]
        logits, tgt = self._token_logits(model, batch)
        tok_lp = torch.log_softmax(logits, -1).gather(1, tgt[:, None]).squeeze(1)
        per_row = torch.zeros(batch["input_ids"].shape[0], device=tok_lp.device).index_add_(0, batch["target_row"], tok_lp)
        return per_row.view(-1, len(self.labels))

    def generate(self, model, texts, dev, max_new_tokens):
        """Free-text completion of each prompt (greedy)."""
        import torch

        out = []
        with torch.inference_mode():
            for ids in self.prompt_ids(list(texts)):
                x = torch.tensor([ids], device=dev)
                y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                   do_sample=False, pad_token_id=self.tok.pad_token_id)
                out.append(self.tok.decode(y[0, len(ids):], skip_special_tokens=True).strip())
        return out
