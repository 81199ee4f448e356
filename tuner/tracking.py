"""MLflow on the driver side: the embedded tracking server, experiments, and links into the UI.
(The runs themselves, and their states, are :mod:`trainables.runs`'.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from filelock import FileLock

from trainables.errors import InputError
from trainables.paths import home

# ------------------------------------------------------------------ the embedded server


def _store() -> Path:
    p = home() / "mlflow"
    (p / "artifacts").mkdir(parents=True, exist_ok=True)
    return p


def _healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001
        return False


def free_port() -> int:
    """A TCP port free on this machine now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def embedded_server(start: bool = True, port: int | None = None) -> str | None:
    """URL of the local MLflow server over the qlora-tune store, started (once) if needed.

    SQLite backend and an artifacts folder under the qlora-tune home; bound to 127.0.0.1; one
    worker and no job execution (7 s to start and ~450 MB instead of 40 s and 1.8 GB)."""
    store = _store()
    info_file = store / "server.json"
    with FileLock(str(store / ".server.lock"), timeout=120):
        if info_file.exists():
            info = json.loads(info_file.read_text())
            if _healthy(info["url"]):
                return info["url"]
        if not start:
            return None
        port = port or free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        log = open(store / "server.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
             "--artifacts-destination", str(store / "artifacts")],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the MLflow server exited with code {proc.returncode}; see {store / 'server.log'}")
            if _healthy(url):
                info_file.write_text(json.dumps({"pid": proc.pid, "url": url, "port": port}))
                return url
            time.sleep(0.5)
        proc.kill()
        raise RuntimeError(f"the MLflow server did not answer within 120 s; see {store / 'server.log'}")


def stop_embedded_server() -> bool:
    info_file = _store() / "server.json"
    if not info_file.exists():
        return False
    info = json.loads(info_file.read_text())
    try:
        os.killpg(info["pid"], signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    info_file.unlink(missing_ok=True)
    return True


def resolve_tracking_uri(uri: str | None) -> str:
    """The configured URI, else ``$MLFLOW_TRACKING_URI``, else the embedded server."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return embedded_server()


# ------------------------------------------------------------------ experiments


def experiment_id(c, name: str, artifact_location: str | None = None) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        # the "model training" view of the MLflow UI (runs table), not the GenAI overview
        return c.create_experiment(name, artifact_location=artifact_location,
                                   tags={"mlflow.experimentKind": "custom_model_development"})
    except Exception:  # noqa: BLE001 - created concurrently
        return c.get_experiment_by_name(name).experiment_id


def runs_link(uri: str, experiment_id: str, study: str | None = None) -> str | None:
    """The MLflow UI's runs table of an experiment (of one study where ``study`` is given), in its
    model-training view: MLflow 3 opens its GenAI view unless the link asks for ``machine_learning``."""
    if not uri.startswith(("http://", "https://")):
        return None
    from urllib.parse import urlencode

    from trainables.runs import STUDY_TAG

    query = {"workflowType": "machine_learning"}
    if study:
        query["searchFilter"] = f"tags.`{STUDY_TAG}` = '{study}'"
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs?{urlencode(query)}"


def run_link(uri: str, experiment_id: str, run_id: str) -> str | None:
    """One run's page in the MLflow UI's model-training view."""
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def require_server(uri: str) -> None:
    if uri.startswith("http") and not _healthy(uri, timeout=5):
        raise InputError(f"tracking.tracking_uri: no MLflow server answers at {uri}")
