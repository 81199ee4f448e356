"""Batch prediction on a Ray cluster (`predict --address`): Ray Data and an actor pool of classifiers.
(Runs before the serving tests, whose replicas would hold the session cluster's CPUs.)"""

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
