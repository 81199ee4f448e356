"""Where the start of Ray Data batch prediction goes (issue 13): one GPU, a SmolLM2-135M-shaped head
model with random weights (as serve_bench.py), 4 actors x 0.25 GPU.

    bash benchmarks/gpu_run.sh data_startup.py

1. probe actors, created as Ray Data creates its pool, time each phase of their start: process
   ready, ``import torch``, CUDA ready, the classifier's imports, the model load, the first batch;
2. Ray Data with an identity actor pool (no model): the pipeline's own start;
3. ``predict --address`` as users run it, with the in-process rate beside it (same call, same card).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


class Probe:
    """A fresh worker loading the classifier as ``Predictor`` does, phase by phase (seconds since ``t0``)."""

    def __init__(self, files: dict, t0: float):
        mark = lambda k: self.t.__setitem__(k, round(time.time() - t0, 2))  # noqa: E731
        self.t: dict = {}
        mark("process")
        import torch

        mark("import_torch")
        torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu")
        mark("cuda_ready")
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        import transformers.models.llama.modeling_llama  # noqa: F401

        from trainables import layout as L
        from trainables.models import dequantized, load_adapter, load_base, resolve_model
        from trainables.predict import read_model_folder
        from tuner.batch_predict import _unpack

        mark("import_transformers_bnb_peft")
        folder = _unpack(files)
        cfg, names, tok = read_model_folder(folder)
        mark("config_tokenizer")
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        base = load_base(cfg, resolve_model(cfg.model), len(names), tok.pad_token_id, dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        mark("base_loaded_nf4")
        model = load_adapter(dequantized(base), folder / L.ADAPTER).merge_and_unload()
        mark("dequantized_adapter_merged")
        from trainables.predict import Classifier

        self.clf = Classifier(folder, batch_size=256)
        mark("classifier_again")
        self.mark, self.model = mark, model

    def first(self, texts: list[str]) -> dict:
        self.clf.predict(texts)
        self.mark("first_batch")
        return self.t


class Identity:
    def __call__(self, batch):
        return batch


def main() -> None:
    import pandas as pd
    import ray
    import ray.data

    from serve_bench import _device_name, _texts, _train_and_register
    from trainables.predict import Classifier
    from tuner.batch_predict import _pack, predict_on_cluster
    from tuner.ray_cluster import connect

    work = Path(tempfile.mkdtemp(prefix="data-startup-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"file://{work}/mlruns")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    res: dict = {"card": _device_name()}
    smoke = os.environ.get("SMOKE") == "1"  # a quick check of this script on a CPU
    gpu = 0.0 if smoke else 0.25
    folder, _ = _train_and_register(work, True, 64 if smoke else 1000)
    big = _texts(300 if smoke else 100_000)
    inp = work / "big.parquet"
    pd.DataFrame({"text": big}).to_parquet(inp)
    clf = Classifier(folder, batch_size=256)
    clf.predict(big[:2048])  # CUDA graphs captured
    t = time.perf_counter()
    labels = clf.predict(big).labels
    res["in_process_s"] = round(time.perf_counter() - t, 2)
    del clf
    t = time.perf_counter()
    connect(None)
    res["ray_init_s"] = round(time.perf_counter() - t, 2)
    files = _pack(folder)
    for n in (1, 2 if smoke else 4):  # one worker alone, then as many at once as the pool starts
        t0 = time.time()
        probes = [ray.remote(num_gpus=gpu, num_cpus=1)(Probe).remote(files, t0) for _ in range(n)]
        res[f"probe_phases_s_{n}"] = ray.get([p.first.remote(big[:32 if smoke else 1024]) for p in probes])
        print(f"probes {n}:", json.dumps(res[f"probe_phases_s_{n}"]), flush=True)
        for p in probes:
            ray.kill(p)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    t = time.perf_counter()
    ds = ray.data.read_parquet(str(inp)).repartition(target_num_rows_per_block=1024)
    first = None
    for b in ds.map_batches(Identity, batch_size=1024, compute=ray.data.ActorPoolStrategy(size=1 if smoke else 4),
                            num_gpus=gpu, num_cpus=1).iter_batches(batch_size=None):
        first = first or round(time.perf_counter() - t, 2)
    res["identity_pipeline"] = {"first_rows_s": first, "total_s": round(time.perf_counter() - t, 2)}
    print("identity:", res["identity_pipeline"], flush=True)
    for layout in os.environ.get("LAYOUTS", "4x0.25").split():
        actors, gpus = layout.split("x")
        gpus = "0" if smoke else gpus
        timings: dict = {}
        t = time.perf_counter()
        predict_on_cluster(folder, inp, work / f"out-{layout}.parquet", "text", "auto", 256, int(actors), float(gpus), timings)
        whole = round(time.perf_counter() - t, 2)
        same = pd.read_parquet(work / f"out-{layout}.parquet")["label"].tolist() == labels
        res[f"predict_{layout}"] = {"whole_s": whole, **timings, "ratio": round(res["in_process_s"] / whole, 3),
                                    "labels_match": same}
        print(layout, res[f"predict_{layout}"], flush=True)
    print(json.dumps(res, indent=2))
    out = os.environ.get("OUT")
    if out:
        Path(out, "data_startup.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
