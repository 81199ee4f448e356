"""Logging a trained folder as an MLflow pyfunc model, and getting folders back from MLflow refs."""

from __future__ import annotations

from pathlib import Path

from trainables import layout as L
from trainables.errors import InputError

MODEL_DIR_ARTIFACT = L.PYFUNC_MODEL_DIR


def pip_requirements() -> list[str]:
    """Explicit requirements of the pyfunc model (the versions it was logged with)."""
    from tuner.versions import installed

    return [f"{p}=={v}" for p, v in installed(("qlora-tune", "torch", "transformers", "peft", "bitsandbytes",
                                               "safetensors", "accelerate", "pandas", "scikit-learn", "pyyaml",
                                               "gguf", "mlflow")).items()]


def log_classifier(folder: Path, name: str = "model", clf=None):
    """Log ``folder`` (output-folder layout) as a pyfunc model in the active run; returns ModelInfo.
    ``clf``: the folder's loaded :class:`Classifier`, if the caller has one (saves loading it again
    for the signature's output example)."""
    import mlflow
    import pandas as pd

    from trainables import pyfunc_model
    from trainables.predict import Classifier

    example = pd.DataFrame({"text": ["I love it.", "This is terrible."]})
    out = pd.DataFrame((clf or Classifier(folder)).predict(example["text"].tolist()).records())
    signature = mlflow.models.infer_signature(example, out)
    return mlflow.pyfunc.log_model(
        name=name, python_model=pyfunc_model.__file__, artifacts={MODEL_DIR_ARTIFACT: str(folder)},
        pip_requirements=pip_requirements(), signature=signature, input_example=example,
    )


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else the embedded server if it runs."""
    import os

    from tuner import tracking

    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking.embedded_server(start=False)
    if not uri:
        raise InputError("no MLflow server: set MLFLOW_TRACKING_URI or start the embedded one with `qlora-tune ui`")
    return uri


def _resolved(ref: str) -> str:
    """``ref`` with a registry alias replaced by the version it points at now (a version's artifacts
    never change; an alias may move)."""
    if not ref.startswith("models:/") or "@" not in ref:
        return ref
    from mlflow import MlflowClient

    name, alias = ref.removeprefix("models:/").rsplit("@", 1)
    return f"models:/{name}/{MlflowClient().get_model_version_by_alias(name, alias).version}"


def download_model_folder(ref: str) -> Path:
    """``runs:/RUN_ID/PATH`` or ``models:/NAME@ALIAS`` (or ``/VERSION``) -> local output folder, kept
    in :func:`trainables.paths.downloads_dir` by the resolved version: fetched once, reused after."""
    import hashlib

    import mlflow

    from trainables.paths import cached_folder, downloads_dir

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        source = _resolved(ref)
        key = hashlib.sha256(f"{uri}\n{source}".encode()).hexdigest()[:20]
        folder = cached_folder(downloads_dir() / key, lambda tmp: mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(tmp)))
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - MlflowException, RestException, missing run/model/alias
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise InputError(f"--model {ref}: cannot load from MLflow ({msg})") from None
    found = sorted(folder.rglob("MLmodel"), key=lambda p: len(p.parts))
    return model_dir_of(found[0].parent if found else folder, ref)


def model_dir_of(local: Path, ref: str) -> Path:
    """The output folder inside a downloaded pyfunc model, as its MLmodel file names it."""
    from mlflow.models import Model

    try:
        conf = Model.load(str(local)).flavors["python_function"]
        folder = local / conf["artifacts"][MODEL_DIR_ARTIFACT]["path"]
    except Exception:  # noqa: BLE001 - no or unreadable MLmodel, not a pyfunc, no such artifact
        raise InputError(f"--model {ref}: not a qlora-tune model (no '{MODEL_DIR_ARTIFACT}' artifact in its MLmodel)") from None
    if not folder.is_dir():
        raise InputError(f"--model {ref}: the model's '{MODEL_DIR_ARTIFACT}' folder is missing")
    return folder
