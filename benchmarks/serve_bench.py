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


def _train_and_register(work: Path, gpu: bool, rows: int) -> tuple[Path, str]:
    import mlflow

    from trainables.config import RunConfig
    from trainables.data import load_dataset
    from trainables.loop import Trainer
    from tuner.registry import log_classifier

    if gpu:
        from random_model import random_model

        model = str(random_model(work / "base"))
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


def _batch_ms(clf, texts: list[str], n: int = 50) -> float:
    """Median milliseconds of one ``predict`` of ``texts`` (one batch)."""
    import statistics

    clf.predict(texts)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        clf.predict(texts)
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1000, 2)


def _labels_match(url: str, clf) -> bool:
    """The server's labels for 400 data texts and the load test's texts, 4 per request, are batch prediction's."""
    import urllib.request

    from serve_load import TEXTS

    check, got = _texts(400) + TEXTS, []
    for s in range(0, len(check), 4):
        req = urllib.request.Request(url + "/predict", data=json.dumps({"texts": check[s:s + 4]}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            got += [p["label"] for p in json.loads(r.read())["predictions"]]
    return got == clf.predict(check[:400]).labels + clf.predict(TEXTS).labels


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
    ap.add_argument("--replicas", type=int, nargs="+", default=None,
                    help="replica counts to load in turn (GPU: each gets 1/N of the card; default 2 on a GPU, 1 on the CPU)")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--batch-wait-ms", type=float, default=2.0)
    ap.add_argument("--procs", type=int, default=None, help="load-generator processes")
    ap.add_argument("--train-rows", type=int, default=1000)
    ap.add_argument("--data-layouts", nargs="+", default=["2x0.5"],
                    help="Ray Data actor layouts to run in turn, each ACTORSxGPUS (e.g. 2x0.5 4x0.25)")
    ap.add_argument("--data-batch", type=int, default=256, help="predict's --batch-size for Ray Data")
    ap.add_argument("--data-via-serve", nargs="*", default=[],
                    help="replica layouts (REPLICASxGPUS) for `predict --via-serve`: Ray Data through a running server")
    ap.add_argument("--no-ray-data", action="store_true", help="skip the Ray Data comparison")
    ap.add_argument("--no-serve", action="store_true", help="skip the serving load (Ray Data only)")
    ap.add_argument("--no-compare", action="store_true", help="skip the eager and 4-bit comparisons")
    ap.add_argument("--no-access-log", action="store_true", help="serve without Serve's access log")
    ap.add_argument("--ingress", default="auto", help="auto, haproxy or proxy (as `serve --ingress`)")
    ap.add_argument("--big", type=int, default=100_000, help="texts for the Ray Data comparison")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"file://{work}/mlruns")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    card = _device_name()
    print(f"== serve bench on {card}", flush=True)

    from trainables.predict import Classifier
    from tuner.ray_cluster import connect
    from tuner.serve import APP_NAME, Batching, Limits, Scaling, application, ingress_env, model_names, resolve_ingress
    from serve_load import load

    folder, ref = _train_and_register(work, a.gpu, a.train_rows)
    clf = Classifier(folder, batch_size=a.max_batch_size if a.cpu else 256)
    res: dict = {"card": card, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    big = _texts(a.big if a.gpu else 2_000)
    res["batch_texts_per_s"] = round(_rate(clf, big[:20_000] if a.gpu else big[:600]), 1)
    print("in-process batch prediction:", res["batch_texts_per_s"], "texts/s", flush=True)
    import numpy as np

    if a.gpu and not a.no_compare:  # the lever: CUDA graphs against eager passes, same merged weights
        eager = Classifier(folder, batch_size=256, graphs=False)
        small = Classifier(folder, batch_size=a.max_batch_size)
        small.warmup()
        res["cuda_graphs"] = {"eager_texts_per_s": round(_rate(eager, big[:20_000]), 1),
                              "graphs_texts_per_s": res["batch_texts_per_s"],
                              **{f"{k}_ms_per_batch_of_16": _batch_ms(c, big[:16]) for k, c in (("eager", eager), ("graphs", small))}}
        e, g = eager.predict(big[:4000]), clf.predict(big[:4000])
        res["cuda_graphs"]["max_abs_prob_diff"] = float(np.abs(e.probabilities - g.probabilities).max())
        res["cuda_graphs"]["label_agreement"] = float(np.mean(np.array(e.labels) == np.array(g.labels)))
        print("cuda graphs:", res["cuda_graphs"], flush=True)
        del eager, small
    if not a.no_compare:  # the merged (dequantized base, adapter folded in) model against the 4-bit base + adapter
        nf4 = Classifier(folder, merge=False, batch_size=256)
        sample = big[:4000] if a.gpu else big[:200]
        a_, b_ = clf.predict(sample), nf4.predict(sample)
        res["merged_vs_nf4"] = {"max_abs_prob_diff": float(np.abs(a_.probabilities - b_.probabilities).max()),
                                "label_agreement": float(np.mean(np.array(a_.labels) == np.array(b_.labels))),
                                "nf4_texts_per_s": round(_rate(nf4, big[:20_000] if a.gpu else big[:300]), 1)}
        print("merged vs nf4:", res["merged_vs_nf4"], flush=True)
        del nf4

    from ray import serve

    ingress = resolve_ingress(a.ingress, Scaling(gpus_per_replica=1.0 if a.gpu else 0.0))
    env = ingress_env(ingress)
    os.environ.update(env)  # before the cluster starts, as `qlora-tune serve` does
    connect(None)
    port = 8765
    logging_config = {"enable_access_log": not a.no_access_log}
    res["serve_options"] = {**logging_config, "ingress": ingress, **env}
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=logging_config)
    url = f"http://127.0.0.1:{port}"
    batching = Batching(a.max_batch_size, a.batch_wait_ms)
    res["layouts"] = []
    for replicas in [] if a.no_serve else a.replicas or ([2] if a.gpu else [1]):
        # GPU: the replicas share the card; CPU: the default (a node's cores shared among the replicas)
        scaling = Scaling(replicas=replicas, gpus_per_replica=1 / replicas if a.gpu else 0.0)
        serve.run(application(model_names([ref]), scaling, batching, Limits()), name=APP_NAME, route_prefix="/",
                  logging_config=logging_config)
        layout: dict = {"replicas": replicas, "gpus_per_replica": scaling.gpus_per_replica,
                        "cpus_per_replica": scaling.replica_cpus(), "max_batch_size": a.max_batch_size,
                        "batch_wait_ms": a.batch_wait_ms, "labels_match_batch": _labels_match(url, clf)}
        print(f"{replicas} replica(s): labels identical to batch prediction:", layout["labels_match_batch"], flush=True)
        for clients in ((20, 200) if a.gpu else (20,)):
            procs = a.procs or (8 if a.gpu else 2)
            load(url, clients, 5, 4, procs)  # warm-up
            r = load(url, clients, a.seconds, 4, procs)
            print(f"{replicas} replica(s), {clients} clients x 4 texts:", json.dumps(r), flush=True)
            layout[f"{clients}_clients"] = {**r, "replicas_stats": _replica_stats(url, replicas)}
        res["layouts"].append(layout)
        serve.delete(APP_NAME)
        _record(res, a.gpu)  # each layout's figures are safe if a later part fails
    serve.shutdown()  # HAProxy with it
    if a.gpu and not a.no_ray_data:
        import pandas as pd

        from tuner.batch_predict import predict_on_cluster

        inp, out = work / "big.parquet", work / "out.parquet"
        pd.DataFrame({"text": big}).to_parquet(inp)
        t = time.perf_counter()
        labels = clf.predict(big).labels
        inproc = time.perf_counter() - t
        # end to end, as a user runs it: `qlora-tune predict` in this process (load, predict, write)
        from tuner.predict_cmd import run_predict

        t = time.perf_counter()
        run_predict(str(folder), [], inp, work / "inproc.parquet", "text", False, 256)
        e2e = time.perf_counter() - t
        runs = []

        def job(layout: str, model, workers, gpus: float, via_serve: bool = False, **extra) -> None:
            """One `predict --address` of the big file, against the in-process figures; recorded at once
            (a later layout that crashes keeps this one's figures)."""
            timings: dict = {}
            t = time.perf_counter()
            rows = predict_on_cluster(model, inp, out, "text", "auto", a.data_batch, workers, gpus, timings,
                                      via_serve=via_serve)
            cluster = time.perf_counter() - t
            steady = (rows - timings["first_rows"]) / max(1e-9, timings["total_s"] - timings["first_rows_s"])
            runs.append({"layout": layout, **extra, "texts": rows, "ray_data_s": round(cluster, 2), **timings,
                         "steady_texts_per_s": round(steady, 1), "ratio": round(inproc / cluster, 3),
                         "ratio_end_to_end": round(e2e / cluster, 3),
                         "labels_match": pd.read_parquet(out)["label"].tolist() == labels})
            print("ray data:", runs[-1], flush=True)
            best = max(runs, key=lambda r: r["ratio"])
            res["ray_data"] = {**best, "in_process_s": round(inproc, 2),
                               "in_process_texts_per_s": round(len(big) / inproc, 1),
                               "in_process_end_to_end_s": round(e2e, 2), "layouts": runs}
            _record(res, a.gpu)

        for layout in a.data_layouts:
            actors, gpus = layout.split("x")
            job(layout, folder, int(actors), float(gpus))
        if a.data_via_serve:  # a warm pool: the replicas of a running server, started beforehand
            serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=logging_config)
        for layout in a.data_via_serve:
            replicas, gpus = layout.split("x")
            t = time.perf_counter()
            serve.run(application(model_names([ref]), Scaling(replicas=int(replicas), gpus_per_replica=float(gpus)),
                                  Batching(a.data_batch, a.batch_wait_ms), Limits()),
                      name=APP_NAME, route_prefix="/", logging_config=logging_config)
            job(f"via-serve {layout}", ref, None, 0.0, via_serve=True, deploy_s=round(time.perf_counter() - t, 2))
            serve.delete(APP_NAME)  # (a shutdown and a new start between layouts killed Serve's controller)
        if a.data_via_serve:
            serve.shutdown()
    _record(res, a.gpu)
    print(json.dumps(res, indent=2))


def _record(res: dict, gpu: bool) -> None:
    """The figures under results.json's keys (each with its ``_card``, and the replica layout they come
    from: the one with the most texts/s at 20 clients), and the whole run under ``serve_runs``."""
    path = Path(os.environ.get("BENCH_RESULTS", ROOT / "benchmarks" / "results.json"))
    data = json.loads(path.read_text()) if path.exists() else {}
    done = [lay for lay in res.get("layouts", []) if all(f"{c}_clients" in lay for c in ((20, 200) if gpu else (20,)))]
    figures: dict = {}
    if done:
        best = max(done, key=lambda lay: lay["20_clients"]["texts_per_s"])
        r20, where = best["20_clients"], f"{best['replicas']} replica(s) x {best['gpus_per_replica']:g} GPU"
        if gpu:
            figures = {"serve_texts_per_s_gpu": r20["texts_per_s"], "serve_p99_ms_gpu": r20["p99_ms"],
                       "serve_200_clients_texts_per_s_gpu": best["200_clients"]["texts_per_s"],
                       "serve_200_clients_p99_ms_gpu": best["200_clients"]["p99_ms"],
                       "serve_200_clients_errors_gpu": best["200_clients"]["errors"],
                       "serve_labels_match_batch_gpu": best["labels_match_batch"], "serve_layout_gpu": where}
        else:
            figures = {"serve_p50_ms_cpu": r20["p50_ms"], "serve_p99_ms_cpu": r20["p99_ms"],
                       "serve_texts_per_s_cpu": r20["texts_per_s"], "serve_layout_cpu": where}
    if "ray_data" in res:
        figures["ray_data_predict_ratio"] = res["ray_data"]["ratio"]
        figures["ray_data_predict_ratio_end_to_end"] = res["ray_data"]["ratio_end_to_end"]
        figures["ray_data_predict_layout"] = res["ray_data"]["layout"]
        cold = [r["ratio"] for r in res["ray_data"]["layouts"] if not r["layout"].startswith("via-serve")]
        if cold:  # actors of the job's own, each loading the model
            figures["ray_data_predict_ratio_cold"] = max(cold)
    for k, v in figures.items():
        data[k], data[f"{k}_card"] = v, res["card"]
    runs = [r for r in data.get("serve_runs", []) if r.get("started") != res["started"]]
    data["serve_runs"] = runs + [dict(res)]
    path.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
