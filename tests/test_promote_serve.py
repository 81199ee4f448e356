"""Promotion to the MLflow registry, the pyfunc model, predict with registry refs, and serving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.conftest import ROOT, free_port, run_cli, tiny_config
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


def test_promote_refit_trains_on_train_and_eval_and_keeps_both_test_figures(promoted):
    """--refit trains the best trial's configuration again on train + eval for the epochs its adapter
    was selected at, registers that model, and records its test figures beside those without refit."""
    import json

    from trainables.data import load_dataset
    from tuner.refs import local_model_folder

    p = run_cli("promote", promoted.name, "--model-name", "tiny-refit", "--refit")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    c = R.client(promoted.tracking_uri)
    mv = c.get_model_version_by_alias("tiny-refit", "champion")
    data = load_dataset(promoted.study.data)
    assert mv.tags["refit"] == "true" and int(mv.tags["refit_train_rows"]) == len(data.train) + len(data.eval)
    prun = c.get_run(mv.tags["promotion_run_id"])
    for k in ("accuracy", "f1_macro"):
        assert float(mv.tags[f"test_{k}"]) == pytest.approx(prun.data.metrics[f"test_{k}"], abs=1e-6)
        assert float(mv.tags[f"test_{k}_without_refit"]) == pytest.approx(prun.data.metrics[f"test_{k}_without_refit"], abs=1e-6)
    assert prun.data.metrics["test_accuracy"] >= 0.9, prun.data.metrics  # the toy data is learnt (chance 0.5)
    os.environ["MLFLOW_TRACKING_URI"] = promoted.tracking_uri
    folder = local_model_folder("models:/tiny-refit@champion")
    info = json.loads((folder / "run_info.json").read_text())
    trial = c.get_run(mv.tags["trial_run_id"])
    assert info["best_epoch"] == int(mv.tags["refit_epochs"]) <= int(trial.data.params["training.epochs"])
    # the registered model was trained on train + eval (its data fingerprint), not the trial's split
    from trainables.data import Dataset, Split

    both = Split(data.train.texts + data.eval.texts, data.train.labels + data.eval.labels)
    assert info["data_fingerprint"] == Dataset(data.label_names, both, None, data.test).fingerprint()
    assert "refit on train + eval" in p.stdout


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


def test_registry_models_are_fetched_once_per_version(promoted, monkeypatch):
    from trainables.paths import downloads_dir

    monkeypatch.setenv("MLFLOW_TRACKING_URI", promoted.tracking_uri)
    mv = R.client(promoted.tracking_uri).get_model_version_by_alias("tiny-champion", "champion")
    from tuner.refs import local_model_folder

    by_alias = local_model_folder("models:/tiny-champion@champion")
    by_version = local_model_folder(f"models:/tiny-champion/{mv.version}")
    assert by_alias == by_version and by_alias.is_relative_to(downloads_dir())  # the alias resolved to its version
    mtime = by_alias.stat().st_mtime_ns
    assert local_model_folder("models:/tiny-champion@champion") == by_alias and by_alias.stat().st_mtime_ns == mtime
    assert (by_alias / "adapter").is_dir()
    assert not [p.name for p in downloads_dir().iterdir() if ".tmp-" in p.name]  # nothing half-written left


def _post(url: str, body: bytes, timeout: float = 60):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"error": raw.decode(errors="replace")}


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def challenger(promoted):
    """A second registered version of tiny-champion (@challenger): another head trial of the study,
    so that both versions share one base when served together."""
    import tempfile
    from pathlib import Path

    import mlflow

    from trainables import layout as L
    from tuner.registry import log_classifier

    c = R.client(promoted.tracking_uri)
    champion = c.get_model_version_by_alias("tiny-champion", "champion")
    trials = [r for r in R.find_runs(c, promoted.experiment_id, promoted.name, "trial")
              if r.data.tags.get("approach") == "head" and R.state_of(r) and R.state_of(r).has_model
              and r.data.tags[R.TRIAL_TAG] != champion.tags["trial_id"]]
    assert trials, "the study needs a second head trial with a model"
    with tempfile.TemporaryDirectory() as d:
        folder = Path(c.download_artifacts(trials[0].info.run_id, L.RUN_MODEL_ARTIFACT, d))
        with R.promotion_run(promoted.tracking_uri, promoted.experiment_id, "challenger", {}):
            info = log_classifier(folder)
        mv = mlflow.register_model(info.model_uri, "tiny-champion")
    c.set_registered_model_alias("tiny-champion", "challenger", mv.version)
    return "models:/tiny-champion@challenger"


@pytest.fixture(scope="module")
def server(promoted, challenger, ray_cluster):
    """`qlora-tune serve` of champion and challenger on the session's Ray cluster: 2 replicas, each
    holding both versions; batches wait up to 50 ms for more texts."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": promoted.tracking_uri}
    proc = subprocess.Popen([sys.executable, "-m", "tuner.cli", "serve", "models:/tiny-champion@champion", challenger,
                             "--address", ray_cluster, "--port", str(port), "--replicas", "2",
                             "--cpus-per-replica", "0.5", "--max-texts", "8", "--batch-wait-ms", "50"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            if _get(url + "/health")["status"] == "ok":
                break
        except Exception:  # noqa: BLE001 - not up yet
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "serve did not come up in 300 s"
            time.sleep(1)
    yield url
    proc.terminate()
    proc.wait(timeout=60)


TEXTS = ["1: service was really great", "2: i think this is awful", "3: the movie was great"]


def _alone(ref: str, promoted):
    from trainables.predict import Classifier
    from tuner.refs import local_model_folder

    os.environ["MLFLOW_TRACKING_URI"] = promoted.tracking_uri
    return Classifier(local_model_folder(ref)).predict(TEXTS)


def _replicas(url: str, want: int, timeout: float = 120) -> dict[int, dict]:
    """/stats of at least ``want`` distinct replicas (requests land on a random one)."""
    seen: dict[int, dict] = {}
    deadline = time.time() + timeout
    while len(seen) < want:
        assert time.time() < deadline, f"saw replicas {sorted(seen)} only"
        try:
            st = _get(url + "/stats")
        except Exception:  # noqa: BLE001 - routed to a replica that just died
            time.sleep(0.5)
            continue
        seen[st["pid"]] = st
    return seen


@pytest.mark.parametrize("alias", ["champion", "challenger"])
def test_serve_answers_like_each_model_alone(server, promoted, alias):
    """Both versions answer from the same server, each exactly as it does alone, in the records
    format that `predict` and the pyfunc model give."""
    code, body = _post(server + "/predict", json.dumps({"texts": TEXTS, "model": alias}).encode())
    assert code == 200, body
    ref = _alone(f"models:/tiny-champion@{alias}", promoted)
    preds = body["predictions"]
    assert [p["label"] for p in preds] == ref.labels and {p["model"] for p in preds} == {alias}
    got = np.array([[p[f"p_{n}"] for n in ref.label_names] for p in preds])
    np.testing.assert_allclose(got, ref.probabilities, atol=1e-5)
    assert body["labels"] == ref.label_names
    code, body = _post(server + "/invocations",
                       json.dumps({"dataframe_records": [{"text": t} for t in TEXTS], "model": alias}).encode())
    assert code == 200 and [p["label"] for p in body["predictions"]] == ref.labels


def test_each_replica_serves_both_versions_over_one_base(server):
    health = _get(server + "/health")
    assert set(health["models"]) == {"champion", "challenger"} and health["default"] == "champion"
    for st in _replicas(server, 2).values():
        assert st["bases"] == 1, st  # two head adapters attached to one quantized base


def test_batch_predict_via_serve_labels_through_the_running_replicas(server, promoted, challenger, ray_cluster,
                                                                     tmp_path):
    """`predict --address --via-serve`: Ray Data hands the rows to the running server's replicas (no
    model of its own), in input order, with the labels the model gives alone; a model the server does
    not serve is one line and exit 2, with no output."""
    import pandas as pd

    texts = [f"{i}: {t}" for i in range(30) for t in ("what a day, just great", "the movie was awful")]
    pd.DataFrame({"id": range(len(texts)), "text": texts}).to_parquet(tmp_path / "in.parquet")
    env = {"MLFLOW_TRACKING_URI": promoted.tracking_uri}
    args = ["--input", tmp_path / "in.parquet", "--output", tmp_path / "out.parquet", "--address", ray_cluster,
            "--via-serve", "--batch-size", "4", "--workers", "2"]
    p = run_cli("predict", "--model", challenger, *args, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "2 Serve replica(s) of 'challenger'" in " ".join(p.stdout.split()), p.stdout[-1000:]
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert list(out["id"]) == list(range(len(texts))) and list(out["text"]) == texts
    from trainables.predict import Classifier
    from tuner.refs import local_model_folder

    os.environ["MLFLOW_TRACKING_URI"] = promoted.tracking_uri
    ref = Classifier(local_model_folder(challenger)).predict(texts)
    assert list(out["label"]) == ref.labels and "model" not in out.columns
    np.testing.assert_allclose(out[[f"p_{n}" for n in ref.label_names]].to_numpy(), ref.probabilities, atol=1e-5)
    (tmp_path / "out.parquet").unlink()
    p = run_cli("predict", "--model", "models:/tiny-champion/1", *args, env=env)
    assert p.returncode == 2 and "not models:/tiny-champion/1" in p.stderr, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "out.parquet").exists()


def test_ingress_haproxy_for_gpu_replicas_and_proxy_for_cpu_ones():
    """``auto`` picks HAProxy (straight to the replicas) for GPU replicas and Serve's proxy for CPU
    ones; HAProxy's environment turns Ray's switch on with free ports for its pages, the proxy's keeps
    direct ingress off."""
    from tuner.serve import Scaling, haproxy_binary, ingress_env, resolve_ingress

    assert resolve_ingress("auto", Scaling(gpus_per_replica=0.5)) == "haproxy"
    assert resolve_ingress("auto", Scaling()) == "proxy" and resolve_ingress("haproxy", Scaling()) == "haproxy"
    assert haproxy_binary(), "ray[serve]'s HAProxy binary is missing"
    env = ingress_env("haproxy")
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] != "8404" and env["RAY_SERVE_HAPROXY_METRICS_PORT"] != "9101"
    env = ingress_env("proxy")
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in env and env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"


def test_concurrent_requests_are_coalesced_into_batches(server):
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int):
        model = ("champion", "challenger")[i % 2]  # a batch may mix versions
        return _post(server + "/predict", json.dumps({"texts": [TEXTS[i % 3]], "model": model}).encode())

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(48)))
    assert all(code == 200 for code, _ in results), [r for r in results if r[0] != 200][:3]
    largest = max(st["largest_batch"] for st in _replicas(server, 2).values())
    assert largest > 1, "the model only ever saw batches of one text"


@pytest.mark.parametrize("body,status,fragment", [
    (b'{"texts": "not a list"}', 422, "must be a list"),
    (b'{"sentences": ["a"]}', 422, 'expected {"texts"'),
    (b'{"texts": []}', 422, "is empty"),
    (b'{"texts": ["ok", ""]}', 422, "texts[1] is empty"),
    (b'{"texts": ["ok", 3]}', 422, "texts[1] is not a string"),
    (b'{"texts": ["ok"], "model": 3}', 422, "'model' must be the name"),
    (b'{"texts": ["ok"], "model": "nope"}', 404, "model 'nope': not served here (serving: champion, challenger)"),
    (b'{"texts": [' + b",".join([b'"a"'] * 9) + b"]}", 413, "exceed the limit of 8"),
    (b'{"texts": ["' + b"x" * 30_000 + b'"]}', 413, "more than 20,000"),
    (b"{not json", 400, "not valid JSON"),
    (b'{"texts": ["' + b"x" * 2_100_000 + b'"]}', 413, "exceeds 2,000,000"),
])
def test_serve_rejects_bad_requests_with_4xx(server, body, status, fragment):
    code, resp = _post(server + "/predict", body)
    assert code == status, resp
    assert fragment in resp["error"] and "\n" not in resp["error"], resp


def test_a_killed_replica_is_replaced_and_only_its_requests_in_flight_fail(server):
    """SIGKILL one of two replicas under load from 6 clients: Serve starts a new one; at most the
    requests in flight on the dead replica (one per client) fail, and requests succeed after."""
    import signal
    import threading

    victim = next(iter(_replicas(server, 2)))
    stop, codes, lock = threading.Event(), [], threading.Lock()

    def client():
        while not stop.is_set():
            try:
                code, _ = _post(server + "/predict", json.dumps({"texts": TEXTS[:2]}).encode(), timeout=30)
            except Exception:  # noqa: BLE001 - a dropped connection counts as a failure
                code = 599
            with lock:
                codes.append(code)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(2)
    os.kill(victim, signal.SIGKILL)
    live = _replicas(server, 2, timeout=180)  # the dead one cannot answer: two live ones = replaced
    assert victim not in live
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    failed = [c for c in codes if c != 200]
    assert len(codes) > 20, codes
    assert len(failed) <= len(threads), f"{len(failed)} of {len(codes)} requests failed: {sorted(set(failed))}"
    assert all(c == 200 for c in codes[-6:]), codes[-12:]


def test_serve_refuses_non_loopback_without_insecure(cli, tmp_path):
    code, _, err = cli("serve", str(tmp_path), "--host", "0.0.0.0")
    assert code == 2 and "--insecure" in err


def test_serve_names_an_unknown_ingress(cli, tmp_path):
    code, _, err = cli("serve", str(tmp_path), "--ingress", "nginx")
    assert code == 2 and "--ingress nginx: choose one of auto, haproxy, proxy" in err, err
