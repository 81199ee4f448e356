"""Promotion to the MLflow registry, the pyfunc model, predict with registry refs, and serving."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.conftest import ROOT, run_cli, tiny_config
from trainables import runs as R


@pytest.mark.parametrize("approach", ["head", "generation"])
def test_pyfunc_reproduces_the_trained_model_exactly(approach, tiny_csv, tmp_path, mlflow_server):
    import mlflow
    import pandas as pd

    from trainables.config import RunConfig
    from trainables.data import load_dataset
    from trainables.loop import Trainer
    from tuner.registry import log_classifier

    cfg = RunConfig.model_validate(tiny_config(tiny_csv, approach=approach))
    assert cfg.quantization == "nf4"
    tr = Trainer(cfg, load_dataset(cfg.data), log=lambda *_: None)
    res = tr.fit()
    out = tr.save_output(tmp_path / "m", res)
    expected, _ = tr.evaluate("test")
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("pyfunc-tests")
    with mlflow.start_run():
        info = log_classifier(out)
    model = mlflow.pyfunc.load_model(info.model_uri)
    got = model.predict(pd.DataFrame({"text": tr.data.test.texts}))
    probs = got[[f"p_{n}" for n in tr.data.label_names]].to_numpy()
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-6)
    assert list(got["label"]) == [tr.data.label_names[i] for i in expected.argmax(1)]
    conf = mlflow.models.get_model_info(info.model_uri).flavors["python_function"]
    assert conf["loader_module"] == "mlflow.pyfunc.loaders.code_model", conf  # models from code: no pickle
    assert str(conf["model_code_path"]).endswith("pyfunc_model.py"), conf


@pytest.fixture(scope="module")
def promoted(finished_study):
    p = run_cli("promote", finished_study.name, "--model-name", "tiny-champion")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return finished_study


def test_promote_registers_with_lineage_and_alias(promoted):
    c = R.client(promoted.tracking_uri)
    mv = c.get_model_version_by_alias("tiny-champion", "champion")
    parent = c.get_run(promoted.parent_run_id)
    assert mv.tags["study"] == promoted.name
    assert mv.tags["trial_id"] in {r.data.tags[R.TRIAL_TAG] for r in
                                   R.find_runs(c, promoted.experiment_id, promoted.name, "trial")}
    assert mv.tags["data_fingerprint"] == parent.data.tags["data_fingerprint"]
    prun = c.get_run(mv.tags["promotion_run_id"])
    assert prun.info.status == "FINISHED" and prun.data.tags[R.KIND_TAG] == "promotion"
    # the registry records what promotion measured; the toy data is learnt (chance is 0.5)
    assert float(mv.tags["test_accuracy"]) == pytest.approx(prun.data.metrics["test_accuracy"], abs=1e-6)
    assert float(mv.tags["test_f1_macro"]) == pytest.approx(prun.data.metrics["test_f1_macro"], abs=1e-6)
    assert prun.data.metrics["test_accuracy"] >= 0.9, prun.data.metrics
    assert {"test/confusion_test.png", "test/confusion_test.json"} <= {a.path for a in c.list_artifacts(prun.info.run_id, "test")}


def test_promote_refuses_a_worse_model_unless_forced(promoted):
    c = R.client(promoted.tracking_uri)
    mv = c.get_model_version_by_alias("tiny-champion", "champion")
    c.set_model_version_tag("tiny-champion", mv.version, "test_f1_macro", "1.5")  # an unbeatable holder
    p = run_cli("promote", promoted.name, "--model-name", "tiny-champion")
    assert p.returncode == 2
    assert "1.5000" in p.stderr and "not moving the alias" in p.stderr, p.stderr
    assert c.get_model_version_by_alias("tiny-champion", "champion").version == mv.version
    p = run_cli("promote", promoted.name, "--model-name", "tiny-champion", "--force")
    assert p.returncode == 0, p.stderr
    assert int(c.get_model_version_by_alias("tiny-champion", "champion").version) > int(mv.version)


def test_predict_with_registry_and_run_refs(promoted, tmp_path):
    c = R.client(promoted.tracking_uri)
    mv = c.get_model_version_by_alias("tiny-champion", "champion")
    env = {"MLFLOW_TRACKING_URI": promoted.tracking_uri}
    for ref in ("models:/tiny-champion@champion", f"runs:/{mv.run_id}/model"):
        p = run_cli("predict", "--model", ref, "--text", "7: what a day, just great", env=env)
        assert p.returncode == 0, p.stderr
        assert "p_pos" in p.stdout
    p = run_cli("predict", "--model", "models:/no-such-model@champion", "--text", "x", env=env)
    assert p.returncode == 2 and "cannot load from MLflow" in p.stderr


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: bytes):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(promoted):
    port = _port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": promoted.tracking_uri}
    proc = subprocess.Popen([sys.executable, "-m", "tuner.cli", "serve", "models:/tiny-champion@champion",
                             "--port", str(port), "--max-texts", "8"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                break
        except Exception:  # noqa: BLE001
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_serve_answers_batches_like_the_model(server, promoted):
    texts = ["1: service was really great", "2: i think this is awful", "3: the movie was great"]
    code, body = _post(server + "/predict", json.dumps({"texts": texts}).encode())
    assert code == 200, body
    preds = body["predictions"]
    assert len(preds) == 3 and all(abs(sum(p["probabilities"].values()) - 1) < 1e-5 for p in preds)
    from trainables.predict import Classifier
    from tuner.refs import local_model_folder

    os.environ["MLFLOW_TRACKING_URI"] = promoted.tracking_uri
    ref = Classifier(local_model_folder("models:/tiny-champion@champion")).predict(texts)
    assert [p["label"] for p in preds] == ref.labels
    code, body = _post(server + "/invocations", json.dumps({"dataframe_records": [{"text": t} for t in texts]}).encode())
    assert code == 200 and len(body["predictions"]) == 3


@pytest.mark.parametrize("body,status,fragment", [
    (b'{"texts": "not a list"}', 422, "must be a list"),
    (b'{"sentences": ["a"]}', 422, 'expected {"texts"'),
    (b'{"texts": []}', 422, "is empty"),
    (b'{"texts": ["ok", ""]}', 422, "texts[1] is empty"),
    (b'{"texts": ["ok", 3]}', 422, "texts[1] is not a string"),
    (b'{"texts": [' + b",".join([b'"a"'] * 9) + b"]}", 413, "exceed the limit of 8"),
    (b'{"texts": ["' + b"x" * 30_000 + b'"]}', 413, "more than 20,000"),
    (b"{not json", 400, "not valid JSON"),
    (b'{"texts": ["' + b"x" * 2_100_000 + b'"]}', 413, "exceeds 2,000,000"),
])
def test_serve_rejects_bad_requests_with_4xx(server, body, status, fragment):
    code, resp = _post(server + "/predict", body)
    assert code == status, resp
    assert fragment in resp["error"], resp


def test_serve_refuses_non_loopback_without_insecure(cli, tmp_path):
    code, _, err = cli("serve", str(tmp_path), "--host", "0.0.0.0")
    assert code == 2 and "--insecure" in err
