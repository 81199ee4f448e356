"""One training loop for both approaches.

``Trainer(cfg, data).fit(on_epoch=...)`` trains, evaluates on eval after every epoch and calls
``on_epoch(report, trainer)``; a Ray Tune trial saves a checkpoint there (:meth:`Trainer.save_checkpoint`)
and reports. :meth:`Trainer.load_checkpoint` continues from one (adapter, optimizer, scheduler, history).
What is approach-specific (model class, loss, scoring) comes from :mod:`trainables.approaches`.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from trainables import layout as L
from trainables import metrics as M
from trainables.approaches import (
    Example,
    autocast,
    batched_log_scores,
    decision_loss,
    make_approach,
    to_device,
    use_bf16,
)
from trainables.compat import keep_4bit_out_of_cpu_packing
from trainables.config import RunConfig
from trainables import distributed as D
from trainables import step_graphs
from trainables.data import Dataset
from trainables.errors import InputError
from trainables.models import (
    apply_liger,
    attach_lora,
    base_key,
    compile_layers,
    dequantize_base_wanted,
    dequantized,
    device,
    fresh_weights,
    liger_wanted,
    load_base,
    load_tokenizer,
    lora_inputs_uncast,
    lora_structure,
    module_bytes,
    pristine_base,
    resolve_model,
    set_lora_numbers,
)
from trainables.paths import build_atomically
from trainables.worker_cache import cached, digest


@dataclass
class EpochReport:
    epoch: int
    metrics: dict[str, float]


@dataclass
class Best:
    """The best epoch so far on the eval metric: its weights (when kept) and its eval report."""

    value: float
    epoch: int
    weights: dict[str, torch.Tensor]
    report: dict


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    final: dict[str, dict] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffled batches of similar lengths: shuffle, sort within mega-batches of 50 batches,
    cut, shuffle the batch order. Less padding, still random."""
    rng = random.Random(seed)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    mega = batch_size * 50
    batches = []
    for s in range(0, len(idx), mega):
        chunk = sorted(idx[s: s + mega], key=lambda i: -lengths[i])
        batches += [chunk[j: j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def epoch_examples(n: int, per_epoch: int | None, seed: int, epoch: int) -> list[int]:
    """The training examples of epoch ``epoch`` (from 0) when epochs hold at most ``per_epoch`` of the
    ``n``: consecutive slices of a stream of shuffled passes over all ``n`` (pass ``p`` shuffled by
    ``seed`` and ``p``), so every example comes once per pass and resuming at an epoch needs nothing
    but its number. Every example, in order, where ``per_epoch`` is None or at least ``n``."""
    if per_epoch is None or per_epoch >= n:
        return list(range(n))
    out, start = [], epoch * per_epoch
    while len(out) < per_epoch:
        p, at = divmod(start + len(out), n)
        order = list(range(n))
        random.Random(f"{seed}/pass/{p}").shuffle(order)
        out += order[at: at + per_epoch - len(out)]
    return out


def graphs_wanted(cfg: RunConfig, dev: torch.device, world: int) -> bool:
    """Whether training steps replay from CUDA graphs (``training.cuda_graphs``)."""
    t = cfg.training
    if t.cuda_graphs is True:
        if world > 1:
            raise InputError("training.cuda_graphs: true needs a single worker (resources_per_trial.workers 1)")
        return True
    return t.cuda_graphs == "auto" and dev.type == "cuda" and world == 1 and not t.graph_clashes()


def _make_optimizer(cfg: RunConfig, params, dev: torch.device, graphs: bool = False):
    t = cfg.training
    if graphs:
        return step_graphs.make_optimizer(params, t.learning_rate, t.weight_decay, dev)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay,
                                 fused=dev.type == "cuda")
    if dev.type != "cuda":
        raise InputError(f"training.optimizer: {t.optimizer} needs a CUDA GPU; use adamw on the CPU")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if t.optimizer == "paged_adamw_8bit" else bnb.optim.PagedAdamW32bit
    return cls(params, lr=t.learning_rate, weight_decay=t.weight_decay)


_ENCODER: ThreadPoolExecutor | None = None


def _encoder() -> ThreadPoolExecutor:
    """The process's one tokenizing thread: splits are encoded while the model is built (the
    tokenizers library lets go of the GIL while it encodes), one at a time, since a tokenizer that a
    reused worker shares between runs must not encode in two threads at once."""
    global _ENCODER
    if _ENCODER is None:
        _ENCODER = ThreadPoolExecutor(1, thread_name_prefix="encode")
    return _ENCODER


class Trainer:
    """A loaded base with LoRA adapters, the encoded data, and the optimizer: one run.

    Inside an initialized ``torch.distributed`` process group (a data-parallel trial) each worker
    trains on its share of every global batch of ``training.batch_size`` examples and evaluates its
    share of each split; gradients and results are combined, so every worker holds the same adapter
    and the same metrics, and the hyperparameters mean the same on any number of workers.

    ``reuse`` takes what earlier runs in this process loaded (:mod:`trainables.worker_cache`): the
    tokenizer, the tokenized splits and a copy of the quantized base; the run is the same either way."""

    def __init__(self, cfg: RunConfig, data: Dataset, dev: torch.device | None = None, log=print,
                 reuse: bool = False, every_bucket: bool = False):
        self.cfg, self.data, self.log = cfg, data, log
        self.every_bucket = every_bucket
        """Graph every length bucket the batches fall in, never padding up to a longer one (what the
        ``gpu: auto`` fit must hold: :attr:`StepGraphs.every_bucket`)."""
        self.dev = dev or device()
        self.rank, self.world = D.rank_and_world()
        t = cfg.training
        self.bf16 = use_bf16(cfg, self.dev)
        if self.dev.type == "cuda":  # memory peaks are this run's (a reused worker ran others before)
            torch.cuda.reset_peak_memory_stats(self.dev)
        t0 = time.perf_counter()
        self.setup_parts: dict[str, float] = {}
        """Seconds of each part of the set-up: ``data`` (tokenizer, tokenized splits), ``base`` (load,
        quantize or copy, dequantize), ``adapters`` (fresh weights, LoRA, compiling), ``optimizer``."""
        self.model_path = resolve_model(cfg.model)
        self.tokenizer = load_tokenizer(self.model_path, cfg.trust_remote_code, reuse=reuse)
        self.approach = make_approach(self.tokenizer, data.label_names, cfg)
        pending = {name: _encoder().submit(self._encode, split, reuse) for name, split in data.splits().items()}
        t0 = self._lap("data", t0)
        self.model, t0 = self._model(reuse, t0)  # while the splits are encoded in the background
        self.encoded = {name: job.result() for name, job in pending.items()}
        """Each split's examples. All are ready before training starts: the tokenizing thread is idle
        then, and runs no Python (nor its garbage collection) while a CUDA graph is captured."""
        self.train_examples = self.approach.training_examples(self.encoded["train"])
        t0 = self._lap("data", t0)  # the wait for the encodings, if any
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        D.broadcast_(self.trainable)
        weights = self.approach.class_weights(data.train.labels)
        self.class_weights = weights.to(self.dev) if weights is not None else None
        self.examples_per_epoch = min(len(self.train_examples), t.epoch_examples or len(self.train_examples))
        self.batches_per_epoch = math.ceil(self.examples_per_epoch / t.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / t.grad_accum)
        self.graphs = graphs_wanted(cfg, self.dev, self.world)
        self.optimizer = _make_optimizer(cfg, self.trainable, self.dev, self.graphs)
        self.step_graphs: step_graphs.StepGraphs | None = None  # made at the first step (after any resume)
        from transformers import get_scheduler

        total = self.steps_per_epoch * t.epochs
        self.scheduler = get_scheduler(
            "constant_with_warmup" if t.scheduler == "constant" else t.scheduler, self.optimizer,
            num_warmup_steps=int(round(t.warmup_ratio * total)), num_training_steps=total,
        )
        self._lap("optimizer", t0)
        self.epoch = 0
        self.history: list[dict] = []
        self.best: Best | None = None
        self.last_eval: tuple[int, dict] | None = None
        """The newest evaluation of the eval split: (epoch, report)."""
        self.setup_seconds = sum(self.setup_parts.values())

    def _model(self, reuse: bool, t0: float):
        """The base with LoRA attached, every trainable weight fresh from the seed (laps ``base`` and
        ``adapters`` from ``t0``; returns the model and the time of its last lap). With ``reuse``,
        the model an earlier run in this process built with the same base and adapters
        (:data:`worker_cache.SIZES`), given fresh weights again, else one built on a copy of the
        process's pristine base. Never kept with ``compile`` (compiled layers stay with their run)."""
        cfg, t = self.cfg, self.cfg.training
        args = (cfg, self.model_path, len(self.data.label_names), self.tokenizer.pad_token_id, self.dev)
        base = pristine_base(*args) if reuse else load_base(*args)
        self.base_bytes = module_bytes(base)
        """Bytes of the base as loaded (quantized): what a reused worker keeps a pristine copy of."""
        self.dequantized_base = dequantize_base_wanted(t.dequantize_base, cfg.quantization, base, self.dev)
        liger = liger_wanted(t.liger_kernel, t.compile, base, self.dev)
        since = [t0]

        def build(base):
            if reuse:
                base = copy.deepcopy(base)
            if self.dequantized_base:
                base = dequantized(base)
            if liger:
                apply_liger(base, self.dev)
            since[0] = self._lap("base", t0)
            model = attach_lora(base, cfg)
            if t.fused_lora:
                from trainables.fused_lora import fuse_lora_layers  # peft's, imported with the model

                fuse_lora_layers(model)
            if self.bf16:
                lora_inputs_uncast(model)
            return model

        if reuse and not t.compile:
            key = (base_key(*args), self.dequantized_base, liger, lora_structure(cfg.lora),
                   t.gradient_checkpointing, self.bf16, t.fused_lora)
            model = cached("model", key, lambda: build(base))
            set_lora_numbers(model, cfg.lora)  # a kept model's alpha and dropout are its last run's
        else:
            model = build(base)
        if "base" not in self.setup_parts:  # a kept model: no base to make
            since[0] = self._lap("base", t0)
        fresh_weights(model, cfg.approach, t.seed)
        seed_everything(t.seed)  # what draws at random later draws the same, however the model was obtained
        if t.compile:
            compile_layers(model)
        return model, self._lap("adapters", since[0])

    def _lap(self, part: str, since: float) -> float:
        """Add the seconds since ``since`` to set-up part ``part`` (on a GPU, once its work is done)."""
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        now = time.perf_counter()
        self.setup_parts[part] = self.setup_parts.get(part, 0.0) + now - since
        return now

    # ----------------------------------------------------------------- pieces

    def _encode(self, split, reuse: bool) -> list[Example]:
        """A split's examples; with ``reuse``, shared (read-only) with earlier runs in this process
        that encoded the same texts the same way."""
        def encode():
            return self.approach.encode(split.texts, split.labels)

        if not reuse:
            return encode()
        key = (str(self.model_path), self.approach.encoding_key(), digest(split.texts, split.labels))
        return cached("encoded", key, encode)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        missing = [n for n in state if n not in params]
        if missing:
            raise InputError(f"checkpoint does not match this model (unknown weights, e.g. {missing[0]})")
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t.to(params[n].device, params[n].dtype))

    def _score_value(self, m: dict) -> float:
        key = self.cfg.training.metric
        v = m.get(f"eval_{key}")
        return -v if key == "loss" else v

    def train_mode(self) -> None:
        """Put the model in training mode, with every 4-bit layer on its differentiable path (an eval
        pass on some CPUs switches bitsandbytes to a packed format that has no backward)."""
        self.model.train()
        keep_4bit_out_of_cpu_packing(self.model)

    def train_epoch(self) -> dict[str, float]:
        t = self.cfg.training
        self.train_mode()
        torch.manual_seed(t.seed + self.epoch)
        chosen = epoch_examples(len(self.train_examples), t.epoch_examples, t.seed, self.epoch)
        lengths = [len(self.train_examples[j].input_ids) for j in chosen]
        by_length = length_grouped_batches(lengths, t.batch_size, t.seed + self.epoch)
        batches = [[chosen[k] for k in b] for b in by_length]
        total_loss, tokens, t0 = 0.0, 0, time.perf_counter()
        if self.graphs:
            steps = self._graphed_steps()
            built = steps.build_seconds
            m = t.pad_to_multiple_of or 1  # the columns each batch will have, before bucketing
            steps.expect([-(-max(lengths[k] for k in b) // m) * m for b in by_length], t.epochs - self.epoch)
            for idx in batches:
                batch = self.approach.collate([self.train_examples[j] for j in idx], train=True)
                tokens += int(batch["attention_mask"].sum())
                total_loss += steps(batch) * len(idx)
                self.scheduler.step()
            return {**self._epoch_metrics(total_loss, tokens, t0), "cuda_graphs": steps.captured,
                    "graphs_seconds": steps.build_seconds - built}  # warming up and capturing: part of train_seconds
        self.optimizer.zero_grad(set_to_none=True)
        for i, idx in enumerate(batches):
            mine = D.share(idx, self.rank, self.world)
            if mine:
                batch = self.approach.collate([self.train_examples[j] for j in mine], train=True)
                tokens += int(batch["attention_mask"].sum())  # counted on the CPU: no wait for the GPU
                batch = to_device(batch, self.dev)
                with autocast(self.dev, self.bf16):
                    loss = self.approach.loss(self.model, batch, self.class_weights)
                # this worker's share of the global batch's mean loss
                (loss * (len(mine) / len(idx)) / t.grad_accum).backward()
                total_loss += loss.detach() * len(mine)
            if (i + 1) % t.grad_accum == 0 or i + 1 == len(batches):
                D.sum_gradients_(self.trainable)
                if t.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.trainable, t.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        return self._epoch_metrics(total_loss, tokens, t0)

    def _graphed_steps(self) -> step_graphs.StepGraphs:
        if self.step_graphs is None:
            # without the padding mask (as graphed scoring, trainables.predict.unmasked_pass): batches are
            # right-padded, so under causal attention no real token sees padding and the loss is the same,
            # and transformers' mask logic, which reads the mask on the host, stays out of the graph
            self.step_graphs = step_graphs.StepGraphs(
                lambda b: self.approach.loss(self.model, {**b, "attention_mask": None}, self.class_weights),
                self.approach.pad_to,
                self.trainable, self.optimizer, self.cfg.training.max_grad_norm, self.cfg.training.batch_size,
                self.dev, context=lambda: autocast(self.dev, self.bf16, cache=False), log=self.log)
            self.step_graphs.every_bucket = self.every_bucket
        return self.step_graphs

    def _epoch_metrics(self, total_loss, tokens: int, t0: float) -> dict[str, float]:
        total_loss, tokens = D.sum_floats(float(total_loss), tokens, dev=self.dev)
        secs = time.perf_counter() - t0
        loss = total_loss / self.examples_per_epoch
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss} in epoch {self.epoch + 1}; lower training.learning_rate")
        m = {"train_loss": loss, "train_seconds": secs,
             "train_samples_per_second": self.examples_per_epoch / secs,
             "train_tokens_per_second": tokens / secs, "workers": self.world,
             "learning_rate": float(self.scheduler.get_last_lr()[0])}
        if self.dev.type == "cuda":  # this process's peaks so far in the run (the trainer reset them)
            m["gpu_memory_peak_gb"] = torch.cuda.max_memory_allocated(self.dev) / 2**30
            m["gpu_memory_reserved_peak_gb"] = torch.cuda.max_memory_reserved(self.dev) / 2**30
        return m

    def evaluate(self, split: str) -> tuple[np.ndarray, dict]:
        """Probabilities ``[N, classes]`` and a full report (with confusion matrix) for one split."""
        self.model.eval()
        examples = self.encoded[split]
        mine = D.share(examples, self.rank, self.world)
        scores = batched_log_scores(self.model, self.approach, mine, self.cfg.training.eval_batch_size,
                                    self.dev, self.bf16)
        scores = D.gather_rows(scores, len(examples), self.rank, self.world)
        loss = decision_loss(scores, [e.label for e in examples], self.class_weights)
        probs = torch.softmax(scores, -1).numpy()
        y = getattr(self.data, split).labels
        rep = M.report(y, probs.argmax(1), self.data.label_names)
        rep["loss"] = loss
        return probs, rep

    # ----------------------------------------------------------------- the loop

    def fit(self, on_epoch: Callable[[EpochReport, "Trainer"], None] | None = None) -> FitResult:
        t = self.cfg.training
        while self.epoch < t.epochs:
            m = self.train_epoch()
            self.epoch += 1
            m["epoch"] = self.epoch
            if self.data.eval is not None:
                t0 = time.perf_counter()
                _, rep = self.evaluate("eval")
                self.last_eval = (self.epoch, rep)
                if self.graphs and self.dev.type == "cuda":
                    torch.cuda.empty_cache()  # the eager pass's cached blocks: graphed steps train from their own pool
                m.update({f"eval_{k}": rep[k] for k in (*M.METRICS, "loss")})
                m["eval_seconds"] = time.perf_counter() - t0
                value = self._score_value(m)
                if self.best is None or value > self.best.value:
                    weights = self.trainable_state() if t.select == "best" else {}
                    self.best = Best(value, self.epoch, weights, rep)
            self.history.append(m)
            self.log(_epoch_line(m, t.epochs))
            if on_epoch:
                on_epoch(EpochReport(self.epoch, m), self)
        return self.finish()

    def finish(self) -> FitResult:
        """Restore the selected epoch's adapter and evaluate every split. The eval split's report of
        that epoch, made when the epoch ended with the same weights, is taken as it is."""
        best_epoch = self.epoch
        if self.cfg.training.select == "best" and self.best and self.best.weights:
            self.load_trainable_state(self.best.weights)
            best_epoch = self.best.epoch
        known = {}
        if self.best is not None and self.best.epoch == best_epoch:
            known["eval"] = self.best.report
        elif self.last_eval is not None and self.last_eval[0] == best_epoch:
            known["eval"] = self.last_eval[1]
        final = {name: known[name] if name in known else self.evaluate(name)[1] for name in self.encoded}
        return FitResult(self.history, best_epoch, final)

    # ----------------------------------------------------------------- checkpoints

    def save_checkpoint(self, folder: Path) -> None:
        """Everything needed to continue: adapter weights, optimizer, scheduler, history, best."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.trainable_state(), str(folder / "trainable.safetensors"))
        if self.best and self.best.weights and self.best.epoch != self.epoch:  # else the same as trainable
            save_file(self.best.weights, str(folder / "best.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   folder / "optimizer.pt")
        state = {"epoch": self.epoch, "history": self.history,
                 "best": {"value": self.best.value, "epoch": self.best.epoch, "report": self.best.report}
                 if self.best else None}
        (folder / "trainer_state.json").write_text(json.dumps(state))

    @staticmethod
    def checkpoint_epoch(folder: Path) -> int:
        """The number of epochs a checkpoint written by :meth:`save_checkpoint` holds."""
        return json.loads((Path(folder) / "trainer_state.json").read_text())["epoch"]

    def load_checkpoint(self, folder: Path) -> None:
        folder = Path(folder)
        trainable = load_file(str(folder / "trainable.safetensors"))
        self.load_trainable_state(trainable)
        opt = torch.load(folder / "optimizer.pt", map_location=self.dev, weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.step_graphs = None  # graphs captured before hold the replaced optimizer state: capture anew
        self.scheduler.load_state_dict(opt["scheduler"])
        state = json.loads((folder / "trainer_state.json").read_text())
        self.epoch, self.history = state["epoch"], state["history"]
        if state["best"]:
            best_file, b = folder / "best.safetensors", state["best"]
            if best_file.exists():
                weights = load_file(str(best_file))
            elif b["epoch"] == self.epoch and self.cfg.training.select == "best":
                weights = trainable  # the newest epoch is the best: saved once
            else:
                weights = {}  # select: last keeps no best weights
            self.best = Best(b["value"], b["epoch"], weights, b["report"])

    def write_best_model(self, folder: Path) -> None:
        """The output-folder layout of the best epoch so far (its eval report as ``final``),
        leaving the weights in training untouched."""
        swap = self.best is not None and bool(self.best.weights) and self.best.epoch != self.epoch
        current = self.trainable_state() if swap else None
        if swap:
            self.load_trainable_state(self.best.weights)
        try:
            epoch = self.best.epoch if self.best else self.epoch
            final = {"eval": self.best.report} if self.best else {}
            write_artifacts(Path(folder), self, FitResult(self.history, epoch, final))
        finally:
            if swap:
                self.load_trainable_state(current)

    # ----------------------------------------------------------------- output

    def save_output(self, out: Path, result: FitResult, overwrite: bool = False) -> Path:
        """Write the output folder atomically: everything ``predict`` needs, plus metrics and plots."""
        out = Path(out)
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise InputError(f"{out}: output folder exists and is not empty (pass --overwrite)")
        build_atomically(out, lambda tmp: write_artifacts(tmp, self, result))
        return out


def write_artifacts(folder: Path, trainer: Trainer, result: FitResult) -> None:
    """The output-folder layout, shared by ``train`` and by trial checkpoints."""
    trainer.model.save_pretrained(folder / L.ADAPTER, safe_serialization=True)
    trainer.tokenizer.save_pretrained(folder / L.TOKENIZER)
    (folder / L.LABELS).write_text(json.dumps({"names": trainer.data.label_names}, indent=2))
    (folder / L.CONFIG).write_text(yaml.safe_dump(trainer.cfg.dump(), sort_keys=False))
    info = {"approach": trainer.cfg.approach, "base_model": trainer.cfg.model,
            "base_model_path": str(trainer.model_path), "quantization": trainer.cfg.quantization,
            "best_epoch": result.best_epoch, "data_fingerprint": trainer.data.fingerprint()}
    (folder / L.RUN_INFO).write_text(json.dumps(info, indent=2))
    (folder / L.METRICS).write_text(json.dumps({"history": result.history, "final": result.final}, indent=2))
    if result.final:
        M.write_reports(result.final, folder / L.PLOTS)


def _epoch_line(m: dict, epochs: int) -> str:
    s = f"epoch {m['epoch']}/{epochs}  train_loss {m['train_loss']:.4f}  {m['train_samples_per_second']:.1f} samples/s"
    if "eval_accuracy" in m:
        s += f"  eval_loss {m['eval_loss']:.4f}  eval_acc {m['eval_accuracy']:.3f}  eval_f1 {m['eval_f1_macro']:.3f}"
    return s
