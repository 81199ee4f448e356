"""GPU benchmarks of qlora-tune (issue 6). Every figure is measured in the same process on the same
card as its baseline; results go to benchmarks/results.json (merged) and are printed as a table.

    python benchmarks/bench.py speed      # 1 trial speed vs the reference recipe, 4 start-up share, 6 inference
    python benchmarks/bench.py packing    # 3 aggregate throughput with 1/2/4/8 trials sharing the GPU
    python benchmarks/bench.py mfu        # 2 model-FLOPs utilisation on a Llama-3.2-1B-shaped random model

Needs the twitter-financial-news CSVs in .devdata/ and a CUDA GPU.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
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


def ours(approach: str, quant: str, rows: int = 2000, epochs: int = 2, batch: int = 64, lr: float | None = None,
         r: int = 16, eval_file: str = "valid.csv"):
    from trainables.config import RunConfig
    from trainables.data import load_dataset
    from trainables.loop import Trainer

    cfg = RunConfig.model_validate({
        "model": "smollm2-135m", "approach": approach, "quantization": quant,
        "lora": {"r": r, "alpha": 2 * r, "dropout": 0.05},
        "training": {"epochs": epochs, "batch_size": batch, "eval_batch_size": 512, "max_length": 96,
                     "learning_rate": lr or (5e-4 if approach == "head" else 3e-4), "select": "last"},
        "data": {"train": str(subset(rows)), "eval": str(DATA / eval_file), "label_names": LABELS},
    })
    t0 = time.perf_counter()
    tr = Trainer(cfg, load_dataset(cfg.data), log=print)
    res = tr.fit()
    train_s = sum(h["train_seconds"] for h in res.history)
    return {"samples_per_s": rows * epochs / train_s, "eval_accuracy": res.history[-1]["eval_accuracy"],
            "setup_s": tr.setup_seconds, "epoch1_train_s": res.history[0]["train_seconds"],
            "total_s": time.perf_counter() - t0, "trainer": tr}


def reference(rows: int = 2000, steps: int = 60, warm: int = 10):
    """The source notebooks' recipe: HF Trainer, NF4, LoRA r16/alpha8 on q,k,v,o, batch 8, gradient
    checkpointing, padding to max_length 512. Time-boxed: samples/s between step ``warm`` and ``steps``."""
    import pandas as pd
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig, Trainer,
                              TrainerCallback, TrainingArguments)

    from trainables.models import resolve_model

    path = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    df = pd.read_csv(subset(rows))
    enc = tok(df["text"].tolist(), padding="max_length", truncation=True, max_length=512)
    ds = [{"input_ids": i, "attention_mask": m, "labels": int(y)} for i, m, y in zip(enc["input_ids"], enc["attention_mask"], df["label"])]
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["score"])
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3, quantization_config=q,
                                                               pad_token_id=tok.pad_token_id, device_map={"": 0 if torch.cuda.is_available() else "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=8, lora_dropout=0.1, task_type="SEQ_CLS",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (warm, steps):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                marks[state.global_step] = time.perf_counter()

    args = TrainingArguments(output_dir="/tmp/ref", per_device_train_batch_size=8, gradient_checkpointing=True,
                             max_steps=steps, learning_rate=1e-4, report_to=[], logging_steps=1000,
                             save_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[Clock()]).train()
    return {"samples_per_s": (steps - warm) * 8 / (marks[steps] - marks[warm])}


def bench_speed() -> None:
    out = {}
    ref = reference()
    out["reference_samples_per_s"] = ref["samples_per_s"]
    for approach in ("head", "generation"):
        for quant in ("nf4", "none"):
            r = ours(approach, quant)
            out[f"{approach}_{quant}"] = {k: v for k, v in r.items() if k != "trainer"}
            if quant == "nf4":
                out[f"train_speedup_{approach}"] = r["samples_per_s"] / ref["samples_per_s"]
                out["trial_overhead_share" if approach == "head" else "trial_overhead_share_generation"] = \
                    r["setup_s"] / (r["setup_s"] + r["epoch1_train_s"])
            if approach == "head" and quant == "none":
                out.update(bench_inference(r["trainer"]))
            del r
            torch.cuda.empty_cache()
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
        "model": "smollm2-135m", "approach": "head", "quantization": "nf4",
        "lora": {"r": 16, "alpha": 32}, "training": {"epochs": 1, "batch_size": 64, "max_length": 96, "seed": i},
        "data": {"train": str(subset(2000)), "label_names": LABELS, "split": {"eval": 0.0, "test": 0.0}},
    })
    tr = Trainer(cfg, load_dataset(cfg.data), log=lambda *_: None)
    tr.train_epoch()  # warm-up (kernels, allocator)
    barrier.wait()
    t = time.perf_counter()
    m = tr.train_epoch()
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


def bench_mfu() -> None:
    """NF4 + LoRA training tokens/s on a random Llama-3.2-1B-shaped model, ours vs reference settings."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig, LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                      num_labels=3, pad_token_id=0, max_position_embeddings=4096)
    path = Path("/tmp/llama1b")
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        LlamaForSequenceClassification(cfg).to(torch.bfloat16).save_pretrained(path)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["score"])
    out = {}
    for name, batch, seq, ckpt, targets, autocast in (
        ("ours", 32, 256, False, "all-linear", True),
        ("reference", 8, 512, True, ["q_proj", "k_proj", "v_proj", "o_proj"], False),
    ):
        model = AutoModelForSequenceClassification.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16,
                                                                   device_map={"": 0})
        n_lin = sum(m.weight.numel() * (2 if m.weight.dtype == torch.uint8 else 1)
                    for n, m in model.named_modules() if "layers" in n and hasattr(m, "weight") and m.weight is not None
                    and m.weight.dim() == 2)
        for p in model.parameters():
            p.requires_grad_(False)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="SEQ_CLS"))
        for p in model.parameters():
            if p.requires_grad and autocast:
                p.data = p.data.float()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
        x = torch.randint(1, 128000, (batch, seq), device="cuda")
        y = torch.randint(0, 3, (batch,), device="cuda")
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else torch.autocast("cuda", enabled=False)

        def step():
            with ctx:
                loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits.float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        n = 15
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        tok_s = n * batch * seq / (time.perf_counter() - t)
        out[f"tokens_per_s_1b_{name}"] = tok_s
        out[f"mfu_1b_nf4_{name}"] = 4 * n_lin * tok_s / PEAK_BF16
        out["params_counted_1b"] = n_lin
        del model, opt
        torch.cuda.empty_cache()
    out["mfu_1b_nf4"] = out["mfu_1b_nf4_ours"]
    save(out)


def bench_study8() -> None:
    """Item 7: the best valid accuracy an 8-minute study reaches (benchmarks/tfns-8min.yaml)."""
    import subprocess

    t = time.time()
    p = subprocess.run([sys.executable, "-m", "tuner.cli", "run", str(ROOT / "benchmarks" / "tfns-8min.yaml"),
                        "--name", f"tfns8-{int(t)}"], cwd=ROOT, capture_output=True, text=True)
    print(p.stdout[-6000:], p.stderr[-3000:])
    from tuner.study import StudyRecord
    from tuner.summary import compute_summary, study_rows

    rec = StudyRecord.load(f"tfns8-{int(t)}")
    df = study_rows(rec)
    s = compute_summary(rec, df)
    save({"tfns_valid_accuracy_8min": float(df["best_eval_accuracy"].max()), "study8_trials": int(len(df)),
          "study8_epochs_run": s["epochs_run"], "study8_wall_s": time.time() - t,
          "study8_best_approach": str(df.loc[df["best_eval_accuracy"].idxmax(), "approach"])})


if __name__ == "__main__":
    {"speed": bench_speed, "packing": bench_packing, "mfu": bench_mfu, "study8": bench_study8}[sys.argv[1]]()
