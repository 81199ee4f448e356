"""Serving and cluster batch-prediction benchmark (issue 13), one command per machine:

    python benchmarks/serve_bench.py --gpu   # one GPU: SmolLM2-135M-shaped base, random weights
    python benchmarks/serve_bench.py --cpu   # this 2-core CPU: the embedded SmolLM2-135M

1. trains a head-approach NF4 adapter for one short epoch and registers it (MLflow file store) as
   ``models:/bench@champion``;
2. in-process batch prediction rate (``Classifier.predict``), the baseline;
3. ``qlora-tune serve``'s Ray Serve application on a local Ray cluster, checked to give the labels batch
   prediction gives, then loaded by 20 clients x 4 texts (and, on the GPU, 200 clients) for
   ``--seconds`` (benchmarks/serve_load.py);
4. on the GPU, Ray Data batch prediction of 100,000 texts (``predict --address``) against the
   in-process rate on the same texts.

Figures go to BENCH_RESULTS (default benchmarks/results.json) under the keys of BENCHMARKS.md. The
GPU run uses random base weights (no 98 MB download): speed does not depend on weight values.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def _random_smollm2(dest: Path) -> Path:
    """A SmolLM2-135M-shaped model (its config and tokenizer, random weights) as a plain HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trainables.models import save_plain

    src = ROOT / ".devdata" / "smollm2-tok"
    cfg = LlamaConfig.from_pretrained(src)
    torch.manual_seed(0)
    save_plain(LlamaForCausalLM(cfg).to(torch.bfloat16), dest)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    return dest


def _train_and_register(work: Path, gpu: bool, rows: int) -> tuple[Path, str]:
    import mlflow

    from trainables.config import RunConfig
    from trainables.data import load_dataset
    from trainables.loop import Trainer
    from tuner.registry import log_classifier

    if gpu:
        model = str(_random_smollm2(work / "base"))
        data = {"train": str(ROOT / ".devdata" / "train.csv"), "eval": str(ROOT / ".devdata" / "valid.csv")}
    else:
        model, data = "smollm2-135m", {"train": "builtin:demo/train.csv", "eval": "builtin:demo/eval.csv"}
    cfg = RunConfig.model_validate({
        "model": model, "approach": "head", "quantization": "nf4",
        "training": {"epochs": 1, "batch_size": 32, "max_length": 64, "learning_rate": 3e-4},
        "data": data,
    })
    ds = load_dataset(cfg.data)
    ds.train.texts, ds.train.labels = ds.train.texts[:rows], ds.train.labels[:rows]
    ds.eval.texts, ds.eval.labels = ds.eval.texts[:rows], ds.eval.labels[:rows]
    tr = Trainer(cfg, ds, log=print)
    out = tr.save_output(work / "model", tr.fit())
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("serve-bench")
    with mlflow.start_run():
        info = log_classifier(out)
    mv = mlflow.register_model(info.model_uri, "bench")
    mlflow.MlflowClient().set_registered_model_alias("bench", "champion", mv.version)
    return out, "models:/bench@champion"


def _texts(n: int) -> list[str]:
    import pandas as pd

    src = ROOT / ".devdata" / "valid.csv"
    base = pd.read_csv(src)["text"].astype(str).tolist() if src.exists() else \
        ["The new update is fantastic.", "My order arrived broken.", "The store opens at nine."]
    return [base[i % len(base)] for i in range(n)]


def _replica_stats(url: str, replicas: int) -> dict:
    """/stats of each replica (requests land on a random one): device, batches, time in the model."""
    import urllib.request

    seen = {}
    for _ in range(20 * replicas):
        with urllib.request.urlopen(url + "/stats", timeout=30) as r:
            st = json.loads(r.read())
        sizes = {int(k): v for k, v in st.pop("batch_sizes").items()}
        st["mean_batch"] = round(sum(k * v for k, v in sizes.items()) / max(1, sum(sizes.values())), 1)
        seen[st["pid"]] = st
        if len(seen) == replicas:
            break
    return seen


def _rate(clf, texts: list[str]) -> float:
    clf.predict(texts[:256])  # warm-up
    t = time.perf_counter()
    clf.predict(texts)
    return len(texts) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--gpu", action="store_true")
    mode.add_argument("--cpu", action="store_true")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--replicas", type=int, default=None)
    ap.add_argument("--gpus-per-replica", type=float, default=0.5)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--batch-wait-ms", type=float, default=2.0)
    ap.add_argument("--procs", type=int, default=None, help="load-generator processes")
    ap.add_argument("--train-rows", type=int, default=1000)
    ap.add_argument("--data-workers", type=int, default=None, help="Ray Data actors (default: predict's)")
    ap.add_argument("--data-gpus", type=float, default=0.5, help="GPUs per Ray Data actor")
    ap.add_argument("--big", type=int, default=100_000, help="texts for the Ray Data comparison")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"file://{work}/mlruns")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    card = _device_name()
    print(f"== serve bench on {card}", flush=True)

    from trainables.predict import Classifier
    from tuner.ray_cluster import connect
    from tuner.serve import APP_NAME, Batching, Limits, Scaling, application, model_names
    from serve_load import TEXTS, load

    folder, ref = _train_and_register(work, a.gpu, a.train_rows)
    clf = Classifier(folder, batch_size=a.max_batch_size if a.cpu else 256)
    res: dict = {"card": card, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    big = _texts(a.big if a.gpu else 2_000)
    res["batch_texts_per_s"] = round(_rate(clf, big[:20_000] if a.gpu else big[:600]), 1)
    print("in-process batch prediction:", res["batch_texts_per_s"], "texts/s", flush=True)
    # the merged (dequantized base, adapter folded in) model against the 4-bit base + adapter it came from
    nf4 = Classifier(folder, merge=False, batch_size=256)
    sample = big[:4000] if a.gpu else big[:200]
    a_, b_ = clf.predict(sample), nf4.predict(sample)
    import numpy as np

    res["merged_vs_nf4"] = {"max_abs_prob_diff": float(np.abs(a_.probabilities - b_.probabilities).max()),
                            "label_agreement": float(np.mean(np.array(a_.labels) == np.array(b_.labels))),
                            "nf4_texts_per_s": round(_rate(nf4, big[:20_000] if a.gpu else big[:300]), 1)}
    print("merged vs nf4:", res["merged_vs_nf4"], flush=True)
    del nf4

    from ray import serve

    connect(None)
    port = 8765
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    replicas = a.replicas or (2 if a.gpu else 1)
    scaling = Scaling(replicas=replicas, gpus_per_replica=a.gpus_per_replica if a.gpu else 0.0,
                      cpus_per_replica=1.0)
    batching = Batching(a.max_batch_size, a.batch_wait_ms)
    serve.run(application(model_names([ref]), scaling, batching, Limits()), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    # the server's labels are batch prediction's
    import urllib.request

    check = _texts(400)
    got = []
    for s in range(0, len(check), 4):
        req = urllib.request.Request(url + "/predict", data=json.dumps({"texts": check[s:s + 4]}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            got += [p["label"] for p in json.loads(r.read())["predictions"]]
    want = clf.predict(check).labels + clf.predict(TEXTS).labels
    for s in range(0, len(TEXTS), 4):
        req = urllib.request.Request(url + "/predict", data=json.dumps({"texts": TEXTS[s:s + 4]}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            got += [p["label"] for p in json.loads(r.read())["predictions"]]
    res["serve_labels_match_batch"] = got == want
    print("labels identical to batch prediction:", res["serve_labels_match_batch"], flush=True)
    config = {"replicas": replicas, "gpus_per_replica": scaling.gpus_per_replica,
              "max_batch_size": a.max_batch_size, "batch_wait_ms": a.batch_wait_ms}
    for clients in ((20, 200) if a.gpu else (20,)):
        procs = a.procs or (8 if a.gpu else 2)
        load(url, clients, 5, 4, procs)  # warm-up
        r = load(url, clients, a.seconds, 4, procs)
        print(f"{clients} clients x 4 texts:", json.dumps(r), flush=True)
        res[f"serve_{clients}_clients"] = {**r, **config, "replicas_stats": _replica_stats(url, replicas)}
        print("  replicas:", json.dumps(res[f"serve_{clients}_clients"]["replicas_stats"]), flush=True)
    serve.delete(APP_NAME)
    if a.gpu:
        _record(res, a.gpu)  # the serving figures are safe if the Ray Data part fails
        import pandas as pd

        from tuner.batch_predict import predict_on_cluster

        inp, out = work / "big.parquet", work / "out.parquet"
        pd.DataFrame({"text": big}).to_parquet(inp)
        t = time.perf_counter()
        labels = clf.predict(big).labels
        inproc = time.perf_counter() - t
        t = time.perf_counter()
        import torch

        rows = predict_on_cluster(folder, inp, out, "text", "auto", 256, a.data_workers,
                                  a.data_gpus if torch.cuda.is_available() else 0.0)
        cluster = time.perf_counter() - t
        res["ray_data"] = {"texts": rows, "in_process_s": round(inproc, 2), "ray_data_s": round(cluster, 2),
                           "ratio": round(inproc / cluster, 3),
                           "labels_match": pd.read_parquet(out)["label"].tolist() == labels}
        print("ray data:", res["ray_data"], flush=True)
    _record(res, a.gpu)
    print(json.dumps(res, indent=2))


def _record(res: dict, gpu: bool) -> None:
    """The figures under results.json's keys (each with its ``_card``), and the whole run under ``serve_runs``."""
    path = Path(os.environ.get("BENCH_RESULTS", ROOT / "benchmarks" / "results.json"))
    data = json.loads(path.read_text()) if path.exists() else {}
    card, r20 = res["card"], res["serve_20_clients"]
    if gpu:
        figures = {"serve_texts_per_s_gpu": r20["texts_per_s"], "serve_p99_ms_gpu": r20["p99_ms"],
                   "serve_200_clients_texts_per_s_gpu": res["serve_200_clients"]["texts_per_s"],
                   "serve_200_clients_errors_gpu": res["serve_200_clients"]["errors"]}
        if "ray_data" in res:
            figures["ray_data_predict_ratio"] = res["ray_data"]["ratio"]
    else:
        figures = {"serve_p50_ms_cpu": r20["p50_ms"]}
    for k, v in figures.items():
        data[k], data[f"{k}_card"] = v, card
    runs = [r for r in data.get("serve_runs", []) if r.get("started") != res["started"]]
    data["serve_runs"] = runs + [dict(res)]
    path.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
