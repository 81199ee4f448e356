"""Batch prediction on a Ray cluster (`predict --address`): Ray Data and an actor pool of classifiers.
(Runs before the serving tests, whose replicas would hold the session cluster's CPUs.) `--via-serve` against the
session cluster is tested with the server, in test_promote_serve.py."""

from __future__ import annotations

import os

import numpy as np

from tests.conftest import run_cli


def test_batch_predict_on_the_cluster_keeps_row_order(promoted, ray_cluster, tmp_path):
    """`predict --address`: Ray Data streams a parquet file through classifier actors; the output
    has the input's rows, in order, with the labels and probabilities in-process prediction gives."""
    import pandas as pd

    texts = [f"{i}: {t}" for i in range(120) for t in ("what a day, just great", "the movie was awful")][:200]
    pd.DataFrame({"id": range(len(texts)), "text": texts}).to_parquet(tmp_path / "in.parquet")
    env = {"MLFLOW_TRACKING_URI": promoted.tracking_uri}
    p = run_cli("predict", "--model", "models:/tiny-champion@champion", "--input", tmp_path / "in.parquet",
                "--output", tmp_path / "out.parquet", "--address", ray_cluster, "--batch-size", "16", env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert list(out["id"]) == list(range(len(texts))) and list(out["text"]) == texts
    from trainables.predict import Classifier
    from tuner.refs import local_model_folder

    os.environ["MLFLOW_TRACKING_URI"] = promoted.tracking_uri
    ref = Classifier(local_model_folder("models:/tiny-champion@champion")).predict(texts)
    assert list(out["label"]) == ref.labels
    np.testing.assert_allclose(out[[f"p_{n}" for n in ref.label_names]].to_numpy(), ref.probabilities, atol=1e-5)
    # a bad row fails the whole job with exit 2, and leaves no output behind
    pd.DataFrame({"text": ["fine", " ", "also fine"]}).to_parquet(tmp_path / "bad.parquet")
    p = run_cli("predict", "--model", "models:/tiny-champion@champion", "--input", tmp_path / "bad.parquet",
                "--output", tmp_path / "bad-out.parquet", "--address", ray_cluster, env=env)
    assert p.returncode == 2 and "empty or non-text value" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "bad-out.parquet").exists()


VIA_SERVE_IN_THROUGHPUT_MODE = r'''
import os, sys
from pathlib import Path
import pandas as pd
from tuner.serve import APP_NAME, ingress_env
os.environ.update(ingress_env("proxy"))  # what `qlora-tune serve` sets on a cluster of its own
import ray
from ray import serve
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # not the session cluster
serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[2])})

@serve.deployment(name="classifier", num_replicas=1, ray_actor_options={"num_cpus": 0.5})
class Echo:  # ClassifierServer's interface without a model: label = the text's last word
    def served(self):
        return {"v1": "models:/m@champion"}

    async def predict(self, texts, model=None):
        return {"predictions": [{"model": model, "label": t.split()[-1], "p_x": 1.0} for t in texts]}

serve.run(Echo.bind(), name=APP_NAME, route_prefix="/")
from tuner.batch_predict import predict_on_cluster
out = Path(sys.argv[1]) / "out.parquet"
pd.DataFrame({"text": [f"row {i}" for i in range(300)]}).to_parquet(Path(sys.argv[1]) / "in.parquet")
predict_on_cluster("models:/m@champion", Path(sys.argv[1]) / "in.parquet", out, "text", None, 16, 2, 0.0,
                   via_serve=True)
assert pd.read_parquet(out)["label"].tolist() == [str(i) for i in range(300)]
serve.shutdown()
print("VIA-SERVE-OK")
'''


def test_via_serve_works_where_serve_runs_in_throughput_mode(tmp_path):
    """`--via-serve` against a cluster started as `qlora-tune serve` starts its own (Serve's throughput
    mode: a handle's router runs on the caller's event loop, which a synchronous Ray Data actor lacks).
    A cluster of its own, in a subprocess, with a model-free deployment of the server's interface."""
    import subprocess
    import sys

    from tests.conftest import ROOT, free_port

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.run([sys.executable, "-c", VIA_SERVE_IN_THROUGHPUT_MODE, str(tmp_path), str(free_port())],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "VIA-SERVE-OK" in p.stdout, (p.stdout[-2000:], p.stderr[-3000:])
