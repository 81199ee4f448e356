"""cluster/: every manifest parses, carries its required fields, and agrees with the others; and a
study runs across two Ray nodes started with `ray start` on this machine."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, learnable_csv, run_cli, tiny_study
from trainables import compat
from trainables import runs as R

CLUSTER = ROOT / "cluster"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all_manifests() -> dict[str, dict]:
    out = {}
    for f in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        for d in _docs(f):
            assert {"apiVersion", "kind", "metadata"} <= set(d), f
            out[f"{d['kind']}/{d['metadata']['name']}"] = d
    return out


def _containers(obj) -> list[dict]:
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "containers":
                found += v
            else:
                found += _containers(v)
    elif isinstance(obj, list):
        for v in obj:
            found += _containers(v)
    return found


def test_no_address_starts_a_cluster_of_its_own_beside_a_running_one(ray_cluster):
    """Without --address a command starts a cluster of its own, as the CLI says, even where `ray start`
    left one on this machine (Ray's default would join that one, and `serve` would then shut down its
    Serve on exit). RAY_ADDRESS, as a Ray job sets it, still chooses the cluster."""
    code = ("from tuner.ray_cluster import connect; connect(None); import ray; "
            "print('GCS', ray.get_runtime_context().gcs_address)")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    gcs = {}
    for case, extra in (("own", {}), ("job", {"RAY_ADDRESS": ray_cluster})):
        p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, **extra}, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        gcs[case] = re.search(r"GCS (\S+)", p.stdout).group(1).rsplit(":", 1)[1]  # the GCS port
    port = ray_cluster.rsplit(":", 1)[1]
    assert gcs["own"] != port and gcs["job"] == port, gcs


def test_a_studys_workers_import_ahead_and_run_the_chained_hook(ray_cluster):
    """A study's job gives its workers trainables.import_ahead as Ray's setup hook: a worker has imported
    the trial's heavy modules by the time its task has waited for them, has not initialised CUDA
    through torch, and has run the hook QLORA_TUNE_WORKER_SETUP_HOOK names first. QLORA_TUNE_IMPORT_AHEAD:
    1 on, 0 off (the benchmarks' baseline), unset (auto) on where the node has a GPU."""
    code = ("import json, ray\n"
            "from trainables import import_ahead as A\n"
            "from tuner.ray_cluster import connect\n"
            "connect(%r, setup_hook=A.HOOK)\n"
            "@ray.remote\n"
            "def probe():\n"
            "    import os, sys\n"
            "    began = A._thread is not None\n"
            "    A.wait()\n"
            "    import torch\n"
            "    return {'began': began, 'imported': [m for m in A.MODULES if m in sys.modules],\n"
            "            'cuda': torch.cuda.is_initialized(), 'chained': os.environ.get('QLT_CHAINED_RAN')}\n"
            "print('PROBE', json.dumps(ray.get(probe.remote())))\n") % ray_cluster
    env = {**os.environ, "QLORA_TUNE_WORKER_SETUP_HOOK": "tests.faults.mark_chained_hook_ran",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    seen = {}
    for case, extra in (("on", {"QLORA_TUNE_IMPORT_AHEAD": "1"}), ("off", {"QLORA_TUNE_IMPORT_AHEAD": "0"}),
                        ("auto", {})):
        p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, **extra}, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        seen[case] = json.loads(re.search(r"PROBE (.+)", p.stdout).group(1))
    from trainables import import_ahead

    assert seen["on"] == {"began": True, "imported": list(import_ahead.MODULES), "cuda": False, "chained": "1"}, seen
    assert seen["off"]["began"] is False and seen["off"]["chained"] == "1", seen
    assert seen["auto"]["began"] is (compat.local_gpu_count() > 0), seen  # auto: where the node has a GPU


def test_launcher_config_passes_rays_own_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert any(t["resources"].get("GPU", 0) > 0 for t in cfg["available_node_types"].values())


def test_kuberay_manifests_have_their_required_fields():
    m = _all_manifests()
    rc = m["RayCluster/qlora-tune"]
    assert rc["apiVersion"] == "ray.io/v1"
    head = rc["spec"]["headGroupSpec"]
    assert "rayStartParams" in head and head["template"]["spec"]["containers"]
    (gpu,) = rc["spec"]["workerGroupSpecs"]
    assert {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(gpu)
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    job = m["RayJob/qlora-tune-study"]
    assert job["spec"]["entrypoint"] and job["spec"]["clusterSelector"]["ray.io/cluster"] == "qlora-tune"
    dep, svc, pvc = m["Deployment/mlflow"], m["Service/mlflow"], m["PersistentVolumeClaim/qlora-tune-shared"]
    assert dep["spec"]["selector"]["matchLabels"] == dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"] == dep["spec"]["template"]["metadata"]["labels"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]


def test_rayservice_serves_the_champion_with_a_valid_serve_config():
    """The RayService's Serve config passes Ray Serve's own schema, names qlora-tune's application
    builder, and its arguments build the application (replicas fit the GPU workers)."""
    from ray.serve.schema import ServeDeploySchema

    svc = _all_manifests()["RayService/qlora-tune-serve"]
    assert svc["apiVersion"] == "ray.io/v1"
    config = ServeDeploySchema.model_validate(yaml.safe_load(svc["spec"]["serveConfigV2"]))
    (app,) = config.applications
    assert app.import_path == "tuner.serve:build_app" and app.route_prefix == "/"
    assert any(m.endswith("@champion") for m in app.args["models"])
    from ray.serve import Application

    from tuner import serve

    assert isinstance(serve.build_app(app.args), Application)
    workers = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus = sum(int(w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) * w["maxReplicas"]
               for w in workers)
    scaling = app.args["scaling"]
    assert scaling["max_replicas"] * scaling["gpus_per_replica"] <= gpus


def test_manifests_agree_with_each_other_and_the_study():
    from tuner.study_config import load_study

    m = _all_manifests()
    images = {c["image"] for d in m.values() for c in _containers(d)}
    launcher = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    images.add(launcher["docker"]["image"])
    assert len(images) == 1, images
    study, _ = load_study(CLUSTER / "study.yaml")
    port = m["Service/mlflow"]["spec"]["ports"][0]["port"]
    assert study.tracking.tracking_uri == f"http://mlflow:{port}"
    assert str(port) in m["Deployment/mlflow"]["spec"]["template"]["spec"]["containers"][0]["command"]
    for d in (m["RayCluster/qlora-tune"], m["RayService/qlora-tune-serve"]):
        for c in _containers(d):
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env["MLFLOW_TRACKING_URI"] == study.tracking.tracking_uri
            assert any(v["mountPath"] == "/mnt/shared" for v in c["volumeMounts"])
    claims = {v["persistentVolumeClaim"]["claimName"] for d in m.values() for v in _find(d, "volumes")}
    assert claims == {"qlora-tune-shared"}
    assert study.storage.startswith("/mnt/shared/")
    entry = m["RayJob/qlora-tune-study"]["spec"]["entrypoint"].split()
    assert entry[:2] == ["qlora-tune", "run"]
    copied = re.search(r"COPY cluster/study.yaml (\S+)", (CLUSTER / "Dockerfile").read_text()).group(1)
    assert entry[2] == copied
    assert study.resources_per_trial.gpu > 0


def _find(obj, key):
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += v if k == key and isinstance(v, list) else _find(v, key)
    elif isinstance(obj, list):
        for v in obj:
            out += _find(v, key)
    return out


@pytest.fixture
def two_nodes(tmp_path):
    """A head and a second node, each with one CPU, as separate `ray start --block` processes on
    loopback; ending those two processes (by PID) ends everything they started."""
    import tempfile

    from tests.conftest import free_port, ray_cli

    port = free_port()
    ray_bin = ray_cli()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    addr = f"127.0.0.1:{port}"
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    nodes: list[subprocess.Popen] = []

    def start(*args: str) -> None:
        p = subprocess.Popen([ray_bin, "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                              "--num-gpus=0", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
        nodes.append(p)
        seen = []
        for line in p.stdout:  # `ray start` says so once the node is up, then blocks
            seen.append(line)
            if "Ray runtime started" in line:
                return
        raise RuntimeError(f"ray start {' '.join(args)} exited {p.wait()}: {''.join(seen)[-2000:]}")

    try:
        start("--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}")
        start(f"--address={addr}")
        yield addr
    finally:
        for p in reversed(nodes):  # only this cluster's processes: the session cluster keeps running
            p.terminate()
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(temp, ignore_errors=True)


def test_study_runs_across_two_nodes_with_shared_storage(two_nodes, tmp_path, yaml_file, mlflow_server):
    storage = tmp_path / "shared" / "ray_results"
    cfg = tiny_study(learnable_csv(tmp_path / "d.csv"), num_trials=4, storage=str(storage),
                     **{"scheduler.type": "none", "scheduler.max_epochs": 2})
    p = run_cli("run", yaml_file(cfg), "--name", "two-nodes", "--address", two_nodes, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    from tuner.records import StudyRecord

    rec = StudyRecord.load("two-nodes")
    c = R.client(rec.tracking_uri)
    runs = R.find_runs(c, rec.experiment_id, rec.name, "trial", parent_run_id=rec.parent_run_id)
    assert len(runs) == 4 and all(r.data.tags[R.STATE_TAG] == "completed" for r in runs)
    nodes = {r.data.tags[R.NODE_TAG] for r in runs}
    assert len(nodes) == 2, nodes
    ckpts = list((storage / "two-nodes").glob("*/checkpoint_*"))
    assert ckpts, "checkpoints must land under the study's storage path"
