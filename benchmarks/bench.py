"""GPU benchmarks of qlora-tune (issue 6). Every figure is measured in the same process on the same
card as its baseline; results go to benchmarks/results.json (merged) and are printed as a table.

    python benchmarks/bench.py speed      # 1 trial speed vs the reference recipe, 4 start-up share, 6 inference
    python benchmarks/bench.py packing    # 3 aggregate throughput with 1/2/4/8 trials sharing the GPU
    python benchmarks/bench.py mfu        # 2 model-FLOPs utilisation on a Llama-3.2-1B-shaped random model
    python benchmarks/bench.py setup      # 4 in detail: set-up fresh / in a reused worker (CPU too)
    python benchmarks/bench.py asha       # 5 ASHA against the same study without early stopping
    python benchmarks/bench.py quality [STUDY.yaml KEY NAME ARGS...]  # issue 16: the best valid accuracy of a budgeted study
    python benchmarks/bench.py study TAG YAML [key=value ...]   # any study: trials/hour, GPU use
    python benchmarks/bench.py refit [STUDY.yaml SEEDS key=value ...]  # issue 16: promote --refit vs none, mean test accuracy

Needs the twitter-financial-news CSVs in .devdata/ and a CUDA GPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from random_model import SHAPES  # noqa: E402 - random-weight Llama shapes (item 2)

DATA = ROOT / ".devdata"
RESULTS = Path(os.environ.get("BENCH_RESULTS", ROOT / "benchmarks" / "results.json"))
LABELS = ["Bearish", "Bullish", "Neutral"]
PEAK_BF16 = 989e12  # H100 SXM dense bf16


def card() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def save(results: dict) -> None:
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    old.update(results)
    old["card"] = card()
    old["versions"] = {m: __import__(m).__version__ for m in ("torch", "transformers", "peft", "bitsandbytes")}
    RESULTS.write_text(json.dumps(old, indent=2))
    print(json.dumps(results, indent=2))


def subset(n: int) -> Path:
    import pandas as pd

    out = DATA / f"train{n}.csv"
    if not out.exists():
        df = pd.read_csv(DATA / "train.csv")
        df.sample(n=min(n, len(df)), random_state=0).to_csv(out, index=False)
    return out


def model_ref() -> str:
    """The embedded SmolLM2-135M, or with ``BENCH_MODEL=random`` a model of its shape with random
    weights (benchmarks/random_model.py: no GGUF to carry; speed only, accuracy means nothing)."""
    if os.environ.get("BENCH_MODEL") != "random":
        return "smollm2-135m"
    dest = Path("/tmp/smollm2-random")
    if not (dest / "config.json").exists():
        from random_model import random_model

        random_model(dest)
    return str(dest)


def run_config(approach: str, quant: str = "nf4", rows: int = 2000, epochs: int = 2, batch: int = 64,
               lr: float | None = None, r: int = 16, eval_file: str = "valid.csv", **training):
    """Our settings for SmolLM2-135M on ``rows`` tweets of twitter-financial-news."""
    from trainables.config import RunConfig

    return RunConfig.model_validate({
        "model": model_ref(), "approach": approach, "quantization": quant,
        "lora": {"r": r, "alpha": 2 * r, "dropout": 0.05},
        "training": {"epochs": epochs, "batch_size": batch, "eval_batch_size": 512, "max_length": 96,
                     "learning_rate": lr or (5e-4 if approach == "head" else 3e-4), "select": "last", **training},
        # every row trains (no test split taken from train), as in the reference recipe
        "data": {"train": str(subset(rows)), "eval": str(DATA / eval_file), "label_names": LABELS,
                 "split": {"eval": 0.0, "test": 0.0}},
    })


def ours(approach: str, quant: str, rows: int = 2000, epochs: int = 2, batch: int = 64, lr: float | None = None,
         r: int = 16, eval_file: str = "valid.csv", warm: int = 10, reuse: bool = False, every_bucket: bool = False,
         masked_attention: bool = False, **training):
    """One run of our Trainer. Besides samples/s over the whole run, the steady rate after ``warm``
    optimizer steps: the same rule the reference recipe is timed by. ``masked_attention``: the base keeps
    transformers' SDPA with its padding mask (before models.right_padded_attention)."""
    from unittest import mock

    from trainables import models
    from trainables.data import load_dataset
    from trainables.loop import Trainer

    cfg = run_config(approach, quant, rows, epochs, batch, lr, r, eval_file, **training)
    t0 = time.perf_counter()
    with mock.patch.object(models, "right_padded_attention", lambda m: False) if masked_attention else contextlib.nullcontext():
        tr = Trainer(cfg, load_dataset(cfg.data), log=print, reuse=reuse, every_bucket=every_bucket)
    n = tr.examples_per_epoch
    per_epoch = math.ceil(n / batch)
    sizes = ([batch] * (per_epoch - 1) + [n - batch * (per_epoch - 1)]) * epochs
    count, marks = [0], {}
    step = tr.scheduler.step  # once per optimizer step, outside any CUDA graph (training.cuda_graphs)

    def timed_step(*a, **k):
        out = step(*a, **k)
        count[0] += 1
        if count[0] in (warm + 1, len(sizes)):  # the device is waited for at these two marks only
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks[count[0]] = time.perf_counter()
        return out

    tr.scheduler.step = timed_step
    res = tr.fit()
    train_s = sum(h["train_seconds"] for h in res.history)
    evals = sum(h.get("eval_seconds", 0.0) for h in res.history[:-1])  # evaluations between the marks
    steady = sum(sizes[warm + 1:]) / (marks[len(sizes)] - marks[warm + 1] - evals)
    graphs_s = sum(h.get("graphs_seconds", 0.0) for h in res.history)
    return {"samples_per_s": n * epochs / train_s, "steady_samples_per_s": steady, "train_rows": n,
            "samples_per_s_with_setup": n * epochs / (train_s + tr.setup_seconds),
            "eval_accuracy": res.history[-1]["eval_accuracy"],
            "eval_accuracy_by_epoch": [h["eval_accuracy"] for h in res.history],
            "setup_s": tr.setup_seconds, "setup_parts": tr.setup_parts, "graphs_s": graphs_s,
            "cuda_graphs": res.history[-1].get("cuda_graphs", 0),
            "graphs_failed": tr.step_graphs.failed if tr.step_graphs is not None else None,
            "graphs_parts": tr.step_graphs.build_parts if tr.step_graphs is not None else None,
            # each graphed length bucket and its replay's measured seconds (what padding up weighs)
            "graph_buckets": {k: b.seconds for k, b in tr.step_graphs.graphs.items()} if tr.step_graphs is not None else None,
            "epoch1_train_s": res.history[0]["train_seconds"],
            "epoch1_eval_s": res.history[0].get("eval_seconds", 0.0),
            "epoch2_train_s": res.history[-1]["train_seconds"],
            "total_s": time.perf_counter() - t0, "trainer": tr}


def reference(rows: int = 2000, epochs: int = 2, warm: int = 10):
    """The source notebooks' recipe: HF Trainer, NF4, LoRA r16/alpha8 on q,k,v,o, batch 8, gradient
    checkpointing, padding to max_length 512, run to the end on the same rows and epochs as ours:
    samples/s over the whole training run, the steady rate after step ``warm``, and valid accuracy."""
    import numpy as np
    import pandas as pd
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig, Trainer,
                              TrainerCallback, TrainingArguments)

    from trainables.models import resolve_model

    path = resolve_model(model_ref())
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def encode(csv: Path) -> list[dict]:
        df = pd.read_csv(csv)
        enc = tok(df["text"].tolist(), padding="max_length", truncation=True, max_length=512)
        return [{"input_ids": i, "attention_mask": m, "labels": int(y)}
                for i, m, y in zip(enc["input_ids"], enc["attention_mask"], df["label"])]

    ds, valid = encode(subset(rows)), encode(DATA / "valid.csv")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["score"])
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3, quantization_config=q,
                                                               pad_token_id=tok.pad_token_id, device_map={"": 0 if torch.cuda.is_available() else "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=8, lora_dropout=0.1, task_type="SEQ_CLS",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    marks = {}

    class Clock(TrainerCallback):
        def _mark(self, key):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks[key] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == warm:
                self._mark("warm")

        def on_train_end(self, args, state, control, **kw):
            marks["steps"] = state.global_step
            self._mark("end")

    args = TrainingArguments(output_dir="/tmp/ref", per_device_train_batch_size=8, per_device_eval_batch_size=64,
                             gradient_checkpointing=True, num_train_epochs=epochs, learning_rate=1e-4, report_to=[],
                             logging_steps=1000, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[Clock()])
    out = trainer.train()
    pred = trainer.predict(valid)
    accuracy = float((np.asarray(pred.predictions).argmax(-1) == np.asarray(pred.label_ids)).mean())
    return {"samples_per_s": rows * epochs / out.metrics["train_runtime"],
            "steady_samples_per_s": (marks["steps"] - warm) * 8 / (marks["end"] - marks["warm"]), "steps": marks["steps"],
            "eval_accuracy": accuracy, "train_s": out.metrics["train_runtime"], "epochs": epochs, "rows": rows}


def restore_llama_module():
    """A function that puts transformers' Llama module back as it is now. Liger patches the module
    itself (RoPE's function, the RMSNorm and MLP classes later models are built from), so a Liger
    variant would otherwise change every variant after it in the process (session 13's 8B MFU rows
    without Liger ran after the 1B Liger ones, and were built from Liger's classes)."""
    import transformers.models.llama.modeling_llama as llama

    pristine = dict(vars(llama))

    def restore() -> None:
        for k, v in pristine.items():
            if vars(llama).get(k) is not v:
                setattr(llama, k, v)

    return restore


SPEED_VARIANTS = {
    # name: (approach, quantization, extra training settings)
    "head_nf4": ("head", "nf4", {"dequantize_base": False}),  # 4-bit layers throughout (graphed steps: the default)
    "head_nf4_eager": ("head", "nf4", {"dequantize_base": False, "cuda_graphs": False}),
    "generation_nf4_eager": ("generation", "nf4", {"dequantize_base": False, "cuda_graphs": False}),
    "head_nf4_compile": ("head", "nf4", {"dequantize_base": False, "compile": True}),
    "generation_nf4": ("generation", "nf4", {"dequantize_base": False}),
    "generation_nf4_compile": ("generation", "nf4", {"dequantize_base": False, "compile": True}),
    "head_nf4_reused": ("head", "nf4", {"dequantize_base": False, "reuse": True}),  # a trial in a reused Ray worker
    "generation_nf4_reused": ("generation", "nf4", {"dequantize_base": False, "reuse": True}),
    # batch 32, LoRA r 32, a higher learning rate: twice the optimizer steps of batch 64 in the same epochs
    "head_nf4_b32": ("head", "nf4", {"dequantize_base": False, "batch": 32, "r": 32, "lr": 1e-3}),
    "generation_nf4_b32": ("generation", "nf4", {"dequantize_base": False, "batch": 32, "r": 32, "lr": 1e-3}),
    "head_nf4_b32_reused": ("head", "nf4", {"dequantize_base": False, "batch": 32, "r": 32, "lr": 1e-3, "reuse": True}),
    "generation_nf4_b32_reused": ("generation", "nf4", {"dequantize_base": False, "batch": 32, "r": 32, "lr": 1e-3,
                                                        "reuse": True}),
    # a graph for every length bucket the batches fall in (before session 14: no padding up to a longer graph)
    # the base dequantized (what dequantize_base: auto does for SmolLM2 on an H200), LoRA fused (the
    # default, training.fused_lora) or peft's own forward
    "head_deq_b32": ("head", "nf4", {"dequantize_base": True, "batch": 32, "r": 32, "lr": 1e-3}),
    "generation_deq_b32": ("generation", "nf4", {"dequantize_base": True, "batch": 32, "r": 32, "lr": 1e-3}),
    "head_deq_b32_unfused": ("head", "nf4", {"dequantize_base": True, "batch": 32, "r": 32, "lr": 1e-3, "fused_lora": False}),
    "generation_deq_b32_unfused": ("generation", "nf4", {"dequantize_base": True, "batch": 32, "r": 32, "lr": 1e-3,
                                                         "fused_lora": False}),
    # the base's attention with transformers' padding mask (before models.right_padded_attention)
    "head_deq_b32_masked": ("head", "nf4", {"dequantize_base": True, "batch": 32, "r": 32, "lr": 1e-3, "masked_attention": True}),
    "generation_deq_b32_masked": ("generation", "nf4", {"dequantize_base": True, "batch": 32, "r": 32, "lr": 1e-3,
                                                        "masked_attention": True}),
    "head_nf4_b32_every": ("head", "nf4", {"dequantize_base": False, "batch": 32, "r": 32, "lr": 1e-3, "every_bucket": True}),
    "generation_nf4_b32_every": ("generation", "nf4", {"dequantize_base": False, "batch": 32, "r": 32, "lr": 1e-3,
                                                       "every_bucket": True}),
    # training.liger_kernel through the Trainer (needs the Liger wheel beside the bundle)
    "head_nf4_b32_liger": ("head", "nf4", {"dequantize_base": False, "batch": 32, "r": 32, "lr": 1e-3, "liger_kernel": True}),
    "generation_nf4_b32_liger": ("generation", "nf4", {"dequantize_base": False, "batch": 32, "r": 32, "lr": 1e-3,
                                                       "liger_kernel": True}),
    # the NF4 base dequantized once before training (training.dequantize_base): the same weights
    "head_nf4_deq": ("head", "nf4", {"dequantize_base": True}),
    "generation_nf4_deq": ("generation", "nf4", {"dequantize_base": True}),
    "head_nf4_deq_reused": ("head", "nf4", {"dequantize_base": True, "reuse": True}),
    "generation_nf4_deq_reused": ("generation", "nf4", {"dequantize_base": True, "reuse": True}),
    "head_nf4_deq_compile": ("head", "nf4", {"dequantize_base": True, "compile": True}),
    "generation_nf4_deq_compile": ("generation", "nf4", {"dequantize_base": True, "compile": True}),
    "head_none": ("head", "none", {}),
    "generation_none": ("generation", "none", {}),
}


def bench_speed() -> None:
    """Item 1 (trial speed vs the reference recipe), 4 (start-up share) and 6 (inference)."""
    out = {}
    # REFERENCE_SAMPLES_PER_S: the reference's rate from an earlier run on this card (skips re-timing it)
    ref = {"samples_per_s": float(os.environ["REFERENCE_SAMPLES_PER_S"])} if os.environ.get("REFERENCE_SAMPLES_PER_S") \
        else reference()
    out["reference_samples_per_s"] = ref["samples_per_s"]
    out["reference"] = ref
    save(out)
    only = os.environ.get("SPEED_VARIANTS")
    restore = restore_llama_module()
    for name, (approach, quant, extra) in SPEED_VARIANTS.items():
        if only and name not in only.split(","):
            continue
        restore()
        try:
            if extra.get("reuse"):
                ours(approach, quant, **{**extra, "epochs": 1})  # the worker's first trial fills its caches
            r = ours(approach, quant, **extra)
        except Exception as e:  # noqa: BLE001 - a variant that fails is reported, the others go on
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            save(out)
            continue
        out[name] = {k: v for k, v in r.items() if k != "trainer"}
        out[name]["speedup"] = r["samples_per_s"] / ref["samples_per_s"]
        out[name]["steady_speedup"] = r["steady_samples_per_s"] / ref["samples_per_s"]
        out[name]["startup_share"] = r["setup_s"] / (r["setup_s"] + r["epoch1_train_s"])
        # of the whole 1-epoch trial: set-up, the epoch's training and its evaluation
        out[name]["startup_share_of_trial"] = r["setup_s"] / (r["setup_s"] + r["epoch1_train_s"] + r["epoch1_eval_s"])
        # the graphs' warm-up and capture are start-up too (paid once per trial, inside epoch 1)
        out[name]["startup_share_with_graphs"] = (r["setup_s"] + r["graphs_s"]) / (r["setup_s"] + r["epoch1_train_s"])
        if name == "head_none":
            out.update(bench_inference(r["trainer"]))
        del r
        torch.cuda.empty_cache()
        save(out)
    for approach in ("head", "generation"):
        if f"{approach}_nf4" in out and "speedup" in out[f"{approach}_nf4"]:
            out[f"train_speedup_{approach}"] = out[f"{approach}_nf4"]["speedup"]
    for key, names in (("trial_overhead_share", ("head_nf4", "head_nf4_b32")),  # a fresh run
                       ("trial_overhead_share_reused", ("head_nf4_reused", "head_nf4_b32_reused"))):
        for name in names:
            if "startup_share" in out.get(name, {}):
                out[key] = out[name]["startup_share"]
                break
    save(out)


def bench_inference(tr) -> dict:
    """Our batched classifier vs a plain transformers text-classification pipeline, same weights."""
    import pandas as pd
    from transformers import pipeline

    from trainables.predict import Classifier

    folder = Path("/tmp/bench-head")
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    tr.save_output(folder, tr.finish())
    texts = pd.read_csv(DATA / "valid.csv")["text"].tolist()
    clf = Classifier(folder, batch_size=512)
    clf.predict(texts[:256])
    torch.cuda.synchronize()
    t = time.perf_counter()
    ours_pred = clf.predict(texts)
    torch.cuda.synchronize()
    ours_s = len(texts) / (time.perf_counter() - t)
    merged = clf.model  # LoRA merged into the bf16 base
    pipe = pipeline("text-classification", model=merged, tokenizer=clf.tokenizer, device=0)
    pipe(texts[:64])
    t = time.perf_counter()
    pipe_out = pipe(texts)
    pipe_s = len(texts) / (time.perf_counter() - t)
    t = time.perf_counter()
    pipe(texts, batch_size=64)
    pipe64_s = len(texts) / (time.perf_counter() - t)
    agree = sum(int(p["label"].split("_")[-1]) == LABELS.index(l) for p, l in zip(pipe_out, ours_pred.labels)) / len(texts)
    return {"inference_samples_per_s": ours_s, "pipeline_samples_per_s": pipe_s, "pipeline_bs64_samples_per_s": pipe64_s,
            "inference_speedup": ours_s / pipe_s, "inference_speedup_vs_bs64": ours_s / pipe64_s,
            "inference_label_agreement": agree}


def _pack_worker(i, n, barrier, q):
    import os

    os.environ["QLORA_TUNE_QUIET"] = "1"
    from trainables.config import RunConfig
    from trainables.data import load_dataset
    from trainables.loop import Trainer

    cfg = RunConfig.model_validate({
        "model": model_ref(), "approach": "head", "quantization": "nf4",
        "lora": {"r": 16, "alpha": 32}, "training": {"epochs": 1, "batch_size": 64, "max_length": 96, "seed": i},
        "data": {"train": str(subset(2000)), "label_names": LABELS, "split": {"eval": 0.0, "test": 0.0}},
    })
    tr = Trainer(cfg, load_dataset(cfg.data), log=lambda *_: None)
    tr.train_epoch()  # warm-up (kernels, allocator)
    barrier.wait()
    t = time.perf_counter()
    tr.train_epoch()
    torch.cuda.synchronize()
    q.put((t, time.perf_counter(), len(tr.train_examples)))


def bench_packing() -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = {}
    for n in (1, 2, 4, 8):
        barrier, q = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_pack_worker, args=(i, n, barrier, q)) for i in range(n)]
        for p in procs:
            p.start()
        res = [q.get() for _ in procs]
        for p in procs:
            p.join()
        wall = max(r[1] for r in res) - min(r[0] for r in res)
        out[f"packing_{n}_samples_per_s"] = sum(r[2] for r in res) / wall
        print(n, out[f"packing_{n}_samples_per_s"], flush=True)
    for n in (2, 4, 8):
        out[f"packing_gain_{n}"] = out[f"packing_{n}_samples_per_s"] / out["packing_1_samples_per_s"]
    save(out)




def nf4_model(shape: str, dev: str = "cuda"):
    """A random-weight LlamaForSequenceClassification of ``shape``, built on the GPU in bf16 and
    quantized to NF4 (double quantization) in place, layer by layer: no checkpoint on disk."""
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(**SHAPES[shape], num_labels=3, pad_token_id=0, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(dev):
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = LlamaForSequenceClassification(cfg)
        finally:
            torch.set_default_dtype(torch.float32)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                          compress_statistics=True, quant_type="nf4", device="meta")
                    q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4").to(dev)
                    setattr(parent, name, q)
        if dev == "cuda":
            torch.cuda.empty_cache()
    n_lin = linear_parameters(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    model.is_loaded_in_4bit = True  # what transformers' quantizer sets: peft then picks its bnb LoRA layers
    return model, n_lin


def dequantize_layers(model) -> None:
    """:func:`nf4_model`'s 4-bit layers replaced, in place, by bf16 linear layers holding the weights
    they dequantize to (what ``training.dequantize_base`` does through transformers for a loaded model)."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for name, q in list(parent.named_children()):
            if isinstance(q, bnb.nn.Linear4bit):
                lin = torch.nn.Linear(q.in_features, q.out_features, bias=False, device="meta")
                lin.weight = torch.nn.Parameter(bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)
                                                .to(torch.bfloat16), requires_grad=False)
                setattr(parent, name, lin)
    model.is_loaded_in_4bit = False
    torch.cuda.empty_cache()


OURS_MFU = dict(batch=32, seq=256, ckpt=False, targets="all-linear", autocast=True, mode="eager", deq=False, liger=False,
                fused=False, rpa=False)
"""Our settings for the MFU part: 32 x 256 tokens, LoRA r16 on all linear layers, bf16 autocast, the NF4 kernels."""
MFU_VARIANTS = {  # name: what differs from OURS_MFU (MFU_VARIANTS in the environment picks some)
    "reference": dict(batch=8, seq=512, ckpt=True, targets=["q_proj", "k_proj", "v_proj", "o_proj"], autocast=False),
    "ours": {},
    "ours_compile": dict(mode="compile"),
    "ours_graphs": dict(mode="graphs"),  # training.cuda_graphs' StepGraphs
    # the NF4 base dequantized once (training.dequantize_base: what `auto` does where it takes <= 10% of the card)
    "ours_deq": dict(deq=True),
    "ours_deq_graphs": dict(deq=True, mode="graphs"),
    "ours_deq_compile": dict(deq=True, mode="compile"),
    # Liger Kernel's Triton RMSNorm, SwiGLU and RoPE patched into the model (the wheel beside the bundle)
    "ours_liger": dict(liger=True),
    "ours_graphs_liger": dict(mode="graphs", liger=True),
    "ours_deq_graphs_liger": dict(deq=True, mode="graphs", liger=True),
    # twice the tokens per step (64 x 256): how far the GEMMs' size moves MFU
    "ours_deq_graphs_liger_b64": dict(deq=True, mode="graphs", liger=True, batch=64),
    # training.fused_lora: LoRA over the dequantized base's linear layers as one autograd function each
    "ours_deq_graphs_liger_fused": dict(deq=True, mode="graphs", liger=True, fused=True),
    "ours_deq_liger_fused": dict(deq=True, liger=True, fused=True),
    "ours_deq_graphs_liger_fused_b64": dict(deq=True, mode="graphs", liger=True, fused=True, batch=64),
    # causal attention without a mask (models.right_padded_attention, as the trainer's bases have): no mask built
    # inside a CUDA graph capture (transformers 5.17 builds one there), SDPA's causal kernels with grouped K/V
    "ours_deq_graphs_liger_fused_rpa": dict(deq=True, mode="graphs", liger=True, fused=True, rpa=True),
    "ours_deq_graphs_liger_fused_rpa_b64": dict(deq=True, mode="graphs", liger=True, fused=True, rpa=True, batch=64),
}


def bench_mfu() -> None:
    """Item 2: NF4 + LoRA training tokens/s and MFU (4 x params x tokens) on random Llama-3.2-1B and
    Llama-3-8B shapes: our settings (with and without compiled layers) against the reference's."""
    from peft import LoraConfig, get_peft_model

    from trainables.models import compile_layers, lora_inputs_uncast

    restore = restore_llama_module()
    out = {}
    only = os.environ.get("MFU_VARIANTS")
    for shape in os.environ.get("MFU_SHAPES", "1b,8b").split(","):
        for name, over in MFU_VARIANTS.items():
            if only and name not in only.split(","):
                continue
            v = {**OURS_MFU, **over}
            batch, seq, ckpt, targets, autocast, compiled = v["batch"], v["seq"], v["ckpt"], v["targets"], v["autocast"], v["mode"]
            key = f"{shape}_{name}"
            model = opt = graphed = None
            try:
                model, n_lin = nf4_model(shape)
                if v["rpa"]:
                    from trainables.models import right_padded_attention

                    assert right_padded_attention(model)
                if v["deq"]:
                    dequantize_layers(model)
                if v["liger"]:
                    from liger_kernel.transformers import apply_liger_kernel_to_llama

                    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                                fused_linear_cross_entropy=False, model=model)
                if ckpt:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                    model.enable_input_require_grads()
                model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="SEQ_CLS"))
                for p in model.parameters():
                    if p.requires_grad and autocast:
                        p.data = p.data.float()
                if autocast:  # as the trainer does (a dequantized base's LoRA layers: no float32 input copies)
                    lora_inputs_uncast(model)
                if v["fused"]:
                    from trainables.fused_lora import fuse_lora_layers

                    fuse_lora_layers(model)
                if compiled == "compile":
                    compile_layers(model)
                x = torch.randint(1, 128000, (batch, seq), device="cuda")
                y = torch.randint(0, 3, (batch,), device="cuda")
                ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else torch.autocast("cuda", enabled=False)
                if compiled == "graphs":
                    from trainables.step_graphs import StepGraphs, make_optimizer

                    params = [p for p in model.parameters() if p.requires_grad]
                    opt = make_optimizer(params, 1e-4, 0.0, x.device)
                    graphed = StepGraphs(
                        lambda b: torch.nn.functional.cross_entropy(model(input_ids=b["input_ids"]).logits.float(), b["labels"]),
                        lambda b, rows, length: b, params, opt, 0.0, batch, x.device,
                        context=lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False))
                    cpu_batch = {"input_ids": x.cpu().pin_memory(), "labels": y.cpu().pin_memory()}

                    def step():
                        graphed(cpu_batch)
                else:
                    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)

                    def step():
                        with ctx:
                            loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits.float(), y)
                        loss.backward()
                        opt.step()
                        opt.zero_grad(set_to_none=True)

                t = time.perf_counter()
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                warm_s = time.perf_counter() - t
                t = time.perf_counter()
                n = 10
                for _ in range(n):
                    step()
                torch.cuda.synchronize()
                tok_s = n * batch * seq / (time.perf_counter() - t)
                out[f"tokens_per_s_{key}"] = tok_s
                out[f"mfu_{key}"] = 4 * n_lin * tok_s / PEAK_BF16
                out[f"warmup_s_{key}"] = warm_s
                out[f"params_counted_{shape}"] = n_lin
                out[f"peak_mem_gb_{key}"] = torch.cuda.max_memory_allocated() / 2**30
                if compiled == "graphs":
                    out[f"graphs_failed_{key}"] = graphed.failed  # None: every step replayed from a graph
                print(key, f"{tok_s:,.0f} tokens/s", f"MFU {out[f'mfu_{key}']:.3f}", flush=True)
            except Exception as e:  # noqa: BLE001
                out[f"error_{key}"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(key, out[f"error_{key}"], flush=True)
            model = opt = graphed = None
            restore()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch._dynamo.reset()
            save(out)
        ours = {k: v for k, v in out.items() if k.startswith(f"mfu_{shape}_ours")}
        if ours:
            out[f"mfu_{shape}_nf4_variant"] = max(ours, key=ours.get)[len(f"mfu_{shape}_"):]
            out[f"mfu_{shape}_nf4"] = max(ours.values())
        save(out)


def visible_gpus() -> list[int]:
    """The physical GPUs this part may use (``CUDA_VISIBLE_DEVICES``, else all), for :class:`GpuSampler`."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [int(g) for g in visible.split(",")] if visible else list(range(torch.cuda.device_count()))


def preconvert(study_yaml: str) -> None:
    """The study's model made ready (the embedded GGUF converted once) before any clock starts."""
    import yaml

    from trainables.models import resolve_model

    resolve_model(yaml.safe_load(Path(study_yaml).read_text())["model"])


def bench_quality(study_yaml: str = str(ROOT / "benchmarks" / "tfns-8min.yaml"), key: str = "tfns_valid_accuracy_8min",
                  name: str = "", *run_args: str) -> None:
    """Issue 16: the best valid accuracy a time-budgeted study reaches, as ``qlora-tune run`` gives it
    (``run_args`` go to the CLI, e.g. ``--warm-start OLD``). Saved under ``key`` and ``<key>_study``."""
    import subprocess

    preconvert(study_yaml)
    t = time.time()
    name = name or f"{Path(study_yaml).stem}-{int(t)}"
    with GpuSampler(visible_gpus()) as gs:
        p = subprocess.run([sys.executable, "-m", "tuner.cli", "run", study_yaml, "--name", name, *run_args],
                           cwd=ROOT, capture_output=True, text=True)
    print(p.stdout[-6000:], p.stderr[-3000:])
    from tuner.records import StudyRecord
    from tuner.summary import compute_summary, study_rows

    rec = StudyRecord.load(name)
    df = study_rows(rec)
    s = compute_summary(rec, df)
    best = df.loc[df["best_eval_accuracy"].idxmax()]
    save({key: float(best["best_eval_accuracy"]),
          f"{key}_study": {"name": name, "file": Path(study_yaml).name, "args": list(run_args), "trials": int(len(df)),
                           "states": s["states"], "epochs_run": s["epochs_run"], "wall_s": round(time.time() - t, 1),
                           "gpu_util": gs.busy(), "time_in_trials": s["time_in_trials"],
                           "max_epochs": rec.study.scheduler.max_epochs,
                           "best_approach": str(best["approach"]),
                           "trials_by_value": [{"trial": str(r["trial_id"]), "approach": str(r["approach"]),
                                                "state": str(r["state"]), "epochs": int(r["epochs"]),
                                                "best": round(float(r["best_eval_accuracy"]), 4),
                                                "history": [round(v, 4) for _, v in r["_history"]],
                                                "wall_s": round(float(r["wall_seconds"]), 1)}
                                               for _, r in df.sort_values("best_eval_accuracy", ascending=False)
                                               .head(8).iterrows()],
                           "best_params": {k: (v.item() if hasattr(v, "item") else v) for k, v in best.items()
                                           if str(k).startswith(("training.", "lora.", "head", "generation")) and v == v}}})


class GpuSampler:
    """Mean GPU utilisation (NVML, every 0.5 s) of the given physical GPUs while a study runs."""

    def __init__(self, gpus: list[int]):
        import threading

        self.handles: list = []
        if gpus:  # none: a dry run on the CPU
            import pynvml

            pynvml.nvmlInit()
            self.nvml, self.handles = pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i) for i in gpus]
        self.samples: list[list[float]] = []
        self.times: list[float] = []
        self.mem: list[float] = [0.0] * len(gpus)
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop_flag.wait(0.5):
            row = []
            for i, h in enumerate(self.handles):
                row.append(self.nvml.nvmlDeviceGetUtilizationRates(h).gpu)
                self.mem[i] = max(self.mem[i], self.nvml.nvmlDeviceGetMemoryInfo(h).used / 2**30)
            self.samples.append(row)
            self.times.append(time.time())

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_flag.set()
        self.thread.join()

    def busy(self) -> float:
        """Mean utilisation over all sampled GPUs (0..1)."""
        rows = self.samples
        return sum(map(sum, rows)) / (100 * len(rows) * len(self.handles)) if rows and self.handles else float("nan")


def bench_study(tag: str, study_yaml: str, *sets: str) -> None:
    """Run one study through the CLI on the GPUs in CUDA_VISIBLE_DEVICES and record trials per hour,
    GPU utilisation, epochs, GPU-seconds and the best metric under ``study_<tag>``."""
    import subprocess

    import numpy as np

    from tuner.records import StudyRecord
    from tuner.summary import compute_summary, study_rows
    from trainables import runs as R

    gpus = visible_gpus()
    name = f"{tag}-{int(time.time())}"
    overrides = [a for kv in sets for a in ("--set", kv)]
    args = [sys.executable, "-m", "tuner.cli", "run", study_yaml, "--name", name, *overrides]
    plan = {}
    if os.environ.get("BENCH_PLAN_FIRST"):  # `qlora-tune plan` first, untimed: gpu: auto's fit then comes from its cache
        t = time.time()
        pp = subprocess.run([sys.executable, "-m", "tuner.cli", "plan", study_yaml, *overrides], cwd=ROOT,
                            capture_output=True, text=True)
        plan = {"plan_s": time.time() - t, "plan_exit_code": pp.returncode}
        print(pp.stdout[-2000:], pp.stderr[-2000:])
    with GpuSampler(gpus) as gs:
        t = time.time()
        p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
        wall = time.time() - t
    print(p.stdout[-4000:], p.stderr[-3000:])
    # the headline first: a part's timeout that strikes while the rest is read keeps these (replaced below)
    save({f"study_{tag}": {"gpus": len(gpus), "card": card(), "wall_s": wall, "exit_code": p.returncode,
                           "gpu_util": gs.busy(), "gpu_mem_peak_gb": gs.mem, "partial": True, **plan}})
    rec = StudyRecord.load(name)
    df = study_rows(rec)
    summ = compute_summary(rec, df)
    c = R.client(rec.tracking_uri)
    rates, starts, ends, tokens, peaks, reserved = [], [], [], 0.0, [], []
    timeline = []  # per trial: when its process started, its function began, its run opened and ended, and its metrics
    for run_id in df["run_id"]:
        h = c.get_metric_history(run_id, "train_samples_per_second")
        rates += [m.value for m in h]
        secs = {m.step: m.value for m in c.get_metric_history(run_id, "train_seconds")}
        tokens += sum(m.value * secs.get(m.step, 0.0) for m in c.get_metric_history(run_id, "train_tokens_per_second"))
        peaks += [max((m.value for m in c.get_metric_history(run_id, "gpu_memory_peak_gb")), default=0.0)]
        reserved += [max((m.value for m in c.get_metric_history(run_id, "gpu_memory_reserved_peak_gb")), default=0.0)]
        run = c.get_run(run_id)
        info = run.info
        timeline.append({"trial_id": run.data.tags.get(R.TRIAL_TAG), "state": run.data.tags.get(R.STATE_TAG),
                         "approach": run.data.tags.get("approach"), "pid": run.data.tags.get(R.PID_TAG),
                         "process_started": run.data.tags.get(R.PROCESS_STARTED_TAG),
                         "entered": run.data.tags.get(R.ENTERED_TAG), "opened": info.start_time / 1000,
                         "import_wait": run.data.tags.get(R.IMPORT_WAIT_TAG),
                         "ended": (info.end_time or 0) / 1000, **run.data.params, **run.data.metrics})
        starts.append(info.start_time / 1000)
        ends.append((info.end_time or info.start_time) / 1000)
    span = max(ends) - min(starts)  # first trial start to last trial end: the study's own overhead excluded
    col = f"best_{rec.study.metric}"
    done = int((df["state"] == "completed").sum())
    out = {"gpus": len(gpus), "card": card(), "wall_s": wall, "exit_code": p.returncode, "trials": int(len(df)),
           "completed": done, "trials_per_hour": len(df) / wall * 3600, "trials_span_s": span,
           # the study's own overhead: the CLI's start to the first trial's start, the last trial's end to the CLI's exit
           "before_first_trial_s": min(starts) - t, "after_last_trial_s": t + wall - max(ends),
           "trials_per_hour_span": len(df) / span * 3600, "epochs_run": summ["epochs_run"],
           "epochs_per_hour": summ["epochs_run"] / wall * 3600, "gpu_util": gs.busy(), "gpu_mem_peak_gb": gs.mem,
           "gpu_seconds": float(df["gpu_seconds"].sum()), "best": float(df[col].max()),
           "trial_train_samples_per_s_median": float(sorted(rates)[len(rates) // 2]) if rates else None,
           "states": summ["states"], "sets": list(sets), "out_of_gpu_memory": summ["out_of_gpu_memory"],
           # where the trials' time went (as `status` shows it), kept here: the study's store stays on the GPU machine
           "time_in_trials": summ["time_in_trials"], "before_first_trial": summ["before_first_trial"],
           # why trials ended errored (each reason's first line, and how many ended so)
           "errored": df.loc[df["state"] == "errored", "reason"].astype(str).str.split("\n").str[0].str[:200]
                        .value_counts().to_dict() if "reason" in df else {},
           # per trial: the most GPU memory its process allocated / held from the device (max over trials, median)
           "trial_gpu_memory_peak_gb": [max(peaks, default=0.0), float(np.median(peaks)) if peaks else 0.0],
           "trial_gpu_memory_reserved_peak_gb": [max(reserved, default=0.0), float(np.median(reserved)) if reserved else 0.0],
           "tokens_trained": tokens,
           "packing": [line for line in p.stdout.splitlines() if "resources_per_trial.gpu: auto" in line][:1], **plan}
    parent = c.get_run(rec.parent_run_id).info
    if rec.trials_returned and parent.end_time:  # after the last trial: Tune's end, the study's report, the CLI's exit
        out["after_last_trial_parts"] = {"tune": rec.trials_returned - max(ends),
                                         "report": parent.end_time / 1000 - rec.trials_returned,
                                         "exit": t + wall - parent.end_time / 1000}
    import pandas as pd  # the trials' timeline and the GPU samples beside the results file, to see where the GPU idled

    folder = RESULTS.parent
    pd.DataFrame(timeline).assign(cli_started=t).to_csv(folder / f"study_{tag}_trials.csv", index=False)
    pd.DataFrame({"time": gs.times, **{f"gpu{i}": [r[i] for r in gs.samples] for i in range(len(gs.handles))}}) \
        .to_csv(folder / f"study_{tag}_gpu_util.csv", index=False)
    n_lin = linear_parameters(model_config(rec.study.model))
    if n_lin:  # the study's MFU: every trial's training tokens (4 x linear params each) over the span and GPUs
        out["study_mfu"] = 4 * n_lin * tokens / (span * max(1, len(gpus)) * PEAK_BF16)
    save({f"study_{tag}": out})


def model_config(model: str):
    """``model``'s transformers config; None where it cannot be read."""
    from transformers import AutoConfig

    from trainables.models import resolve_model

    try:
        return AutoConfig.from_pretrained(resolve_model(model))
    except Exception:  # noqa: BLE001 - MFU is then left out
        return None


def linear_parameters(c) -> int:
    """The decoder layers' linear weights of a Llama config ``c`` (the N of MFU's 4 x N x tokens); 0 for None."""
    if c is None:
        return 0
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    return c.num_hidden_layers * (c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size)


def bench_setup(repeats: str = "3") -> None:
    """Item 4 in detail: a trial's set-up (tokenizer, tokenized splits, base, adapters, optimizer) in a
    fresh process, and in a reused worker with only the base cached or everything cached. Runs on
    the CPU too (then NF4 loading is slow and the fresh figure means little)."""
    import statistics

    from trainables import worker_cache as W
    from trainables.data import load_dataset
    from trainables.loop import Trainer

    out = {}
    for approach in ("head", "generation"):
        cfg = run_config(approach, epochs=1)

        def setup(reuse: bool) -> float:
            return Trainer(cfg, load_dataset(cfg.data), log=lambda *_: None, reuse=reuse).setup_seconds

        W.clear()
        fresh = setup(False)
        setup(True)  # the worker's first trial fills the caches
        base_only, everything = [], []
        for _ in range(int(repeats)):
            W.clear("tokenizer", "encoded")
            base_only.append(setup(True))
            everything.append(setup(True))
        out[f"setup_s_{approach}"] = {"fresh": fresh, "base_cached": statistics.median(base_only),
                                      "all_cached": statistics.median(everything)}
        save(out)


def bench_asha(study_yaml: str = str(ROOT / "benchmarks" / "asha.yaml"), *sets: str) -> None:
    """Item 5: one study with ASHA and its twin without early stopping (same trials count, space and
    seed). Compute share: the larger of the epochs ratio and the GPU-seconds ratio."""
    bench_study("asha", study_yaml, *sets, "scheduler.type=asha")
    bench_study("noes", study_yaml, *sets, "scheduler.type=none")
    r = json.loads(RESULTS.read_text())
    a, n = r["study_asha"], r["study_noes"]
    shares = [a["epochs_run"] / n["epochs_run"]] + ([a["gpu_seconds"] / n["gpu_seconds"]] if n["gpu_seconds"] else [])
    save({"asha_compute_share": max(shares), "asha_epoch_share": shares[0],
          "asha_best": a["best"], "asha_noes_best": n["best"], "asha_best_gap": n["best"] - a["best"]})


def bench_refit(study_yaml: str = str(ROOT / "benchmarks" / "sls-refit.yaml"), seeds: str = "3", *sets: str) -> None:
    """Issue 16: ``promote --refit`` against no refit, on test accuracy averaged over study seeds. Each
    seed runs the (short, budgeted) study, then promotes its best trial with ``--refit``; the registry
    holds both test figures. Saved under ``refit_test_accuracy``."""
    import subprocess

    from mlflow import MlflowClient

    from tuner.records import StudyRecord

    preconvert(study_yaml)
    rows = []
    for seed in range(int(seeds)):
        name = f"{Path(study_yaml).stem}-seed{seed}-{int(time.time())}"
        # the searcher's seed and the trials' (adapter initialisation, data order, dropout)
        args = ["--set", f"seed={seed}", "--set", f"training.seed={seed}"] + [a for kv in sets for a in ("--set", kv)]
        for cmd in (["run", study_yaml, "--name", name, *args],
                    ["promote", name, "--refit", "--force", "--model-name", name]):
            p = subprocess.run([sys.executable, "-m", "tuner.cli", *cmd], cwd=ROOT, capture_output=True, text=True)
            print(p.stdout[-1500:], p.stderr[-1500:], flush=True)
            if p.returncode:
                raise SystemExit(f"{cmd[0]} failed for seed {seed}")
        rec = StudyRecord.load(name)
        c = MlflowClient(rec.tracking_uri)
        mv = c.get_model_version_by_alias(name, "champion")
        rows.append({"seed": seed, "refit": float(mv.tags["test_accuracy"]),
                     "without_refit": float(mv.tags["test_accuracy_without_refit"]),
                     "refit_epochs": int(mv.tags["refit_epochs"]), "refit_rows": int(mv.tags["refit_train_rows"])})
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("refit", "without_refit")}
    save({"refit_test_accuracy": mean["refit"], "refit_test_accuracy_without": mean["without_refit"],
          "refit_card": card(), "refit_runs": {"file": Path(study_yaml).name, "sets": list(sets), "seeds": rows}})


def bench_graphs(rows: str = "2000", epochs: str = "2", batch: str = "32", bases: str = "dequantized") -> None:
    """Issue 14: training steps replayed from CUDA graphs (``training.cuda_graphs``) against the plain
    loop, same process, same card, same settings (the default study's best: LoRA r 32, dropout 0.05;
    ``bases``: ``dequantized`` (NF4 dequantized once, what ``dequantize_base: auto`` picks for a small
    model) and/or ``nf4`` (bitsandbytes' 4-bit kernels in the step), comma-separated). Epoch 1 includes
    each length bucket's warm-up and capture; the last epoch is the steady rate. Train losses show that
    both learn the same."""
    out = {"rows": int(rows), "epochs": int(epochs), "batch": int(batch), "model": model_ref()}
    for base, approach, graphs in [(b, a, g) for b in bases.split(",") for a in ("head", "generation")
                                   for g in (False, True)]:
        tail = "" if base == "dequantized" else f"_{base}"
        name = f"{approach}_{'graphs' if graphs else 'plain'}{tail}"
        try:
            torch.cuda.reset_peak_memory_stats()
            r = ours(approach, "nf4", int(rows), int(epochs), int(batch), 1e-3, 32,
                     dequantize_base=base == "dequantized", cuda_graphs=graphs)
            tr, h = r["trainer"], r["trainer"].history
            out[name] = {"setup_s": round(r["setup_s"], 2), "total_s": round(r["total_s"], 2),
                         "epoch_train_s": [round(e["train_seconds"], 2) for e in h],
                         "train_loss": [round(e["train_loss"], 4) for e in h],
                         "eval_loss": [round(e.get("eval_loss", float("nan")), 4) for e in h],
                         "eval_accuracy": [round(e.get("eval_accuracy", float("nan")), 4) for e in h],
                         "steady_samples_per_s": round(h[-1]["train_samples_per_second"], 1),
                         "train_rows": r["train_rows"],
                         "graphs": tr.step_graphs.captured if tr.step_graphs else 0,
                         "capture_failed": tr.step_graphs.failed if tr.step_graphs else None,
                         "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
            del tr, r
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - report and go on
            import traceback

            traceback.print_exc()
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        print(name, out[name], flush=True)
        if graphs:
            p, g = out.get(f"{approach}_plain{tail}", {}), out.get(name, {})
            if "steady_samples_per_s" in p and "steady_samples_per_s" in g:
                out[f"{approach}_graphs_speedup{tail}"] = round(g["steady_samples_per_s"] / p["steady_samples_per_s"], 2)
    save({"step_graphs": out, "step_graphs_card": card()})


if __name__ == "__main__":
    parts = {"speed": bench_speed, "graphs": bench_graphs, "packing": bench_packing, "mfu": bench_mfu, "quality": bench_quality,
             "study": bench_study, "asha": bench_asha,
             "setup": bench_setup, "refit": bench_refit}
    parts[sys.argv[1]](*sys.argv[2:])
