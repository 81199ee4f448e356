"""Shared fixtures: one state home per test session (model cache, MLflow store, Ray), helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"

# One home for the whole session; converted models are kept across sessions, study state is not.
os.environ.setdefault("QLORA_TUNE_HOME", str(ROOT / ".state" / "test-home"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray's token authentication stays on in tests too

from trainables.config import set_dotted  # noqa: E402
from tuner.console import quiet_libraries  # noqa: E402
from tuner.tracking import free_port  # noqa: E402,F401 - the tests' too

quiet_libraries()


def pytest_configure(config):
    """Clear the last session's study state, once, in the pytest process only (worker processes
    that import this module, e.g. spawned data-parallel workers, must not touch the live store)."""
    import shutil

    for stale in ("studies", "mlflow", "ray_results"):
        shutil.rmtree(Path(os.environ["QLORA_TUNE_HOME"]) / stale, ignore_errors=True)


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process; returns (exit_code, stdout, stderr)."""
    from tuner.cli import main

    def run(*args: str):
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def run_cli(*args: str, env: dict | None = None, timeout: int = 600, cwd: Path | None = None):
    """Run ``qlora-tune`` as a real process."""
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "tuner.cli", *map(str, args)], capture_output=True, text=True,
                          env=e, timeout=timeout, cwd=cwd or ROOT)


TINY_DATA_ROWS = [
    ("the movie was great", "pos"), ("what a day, just great", "pos"),
    ("service was really great", "pos"), ("i think this is great", "pos"),
    ("the movie was awful", "neg"), ("what a day, just awful", "neg"),
    ("service was really awful", "neg"), ("i think this is awful", "neg"),
]


@pytest.fixture
def tiny_csv(tmp_path) -> Path:
    """A small learnable data set: texts ending in 'great' are pos, 'awful' neg (48 rows)."""
    return learnable_csv(tmp_path / "tiny.csv")


def tiny_config(train: Path, **over) -> dict:
    cfg = {
        "model": "tiny-random-llama", "approach": "head", "quantization": "nf4",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"epochs": 1, "batch_size": 8, "eval_batch_size": 32, "max_length": 160,
                     "learning_rate": 5e-3, "warmup_ratio": 0.0},
        "generation": {"prompt_template": "{text} =>"},
        "data": {"train": str(train), "split": {"eval": 0.25, "test": 0.25, "seed": 0}},
    }
    for k, v in over.items():
        set_dotted(cfg, k, v)
    return cfg


@pytest.fixture
def yaml_file(tmp_path):
    import yaml

    def make(cfg: dict, name: str = "config.yaml") -> Path:
        return write(tmp_path / name, yaml.safe_dump(cfg))

    return make


# ------------------------------------------------------------------ one Ray cluster, one MLflow server


@pytest.fixture(scope="session")
def mlflow_server():
    """The embedded MLflow server over the test home, shared by every test."""
    from tuner import tracking

    url = tracking.embedded_server()
    yield url
    tracking.stop_embedded_server()


def ray_cli() -> str:
    """The ``ray`` command of this environment, with a token for Ray's token authentication
    (``ray start`` with RAY_AUTH_MODE=token refuses to start without one on a fresh machine)."""
    import shutil

    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    subprocess.run([ray_bin, "get-auth-token", "--generate"], check=True, capture_output=True, timeout=120)
    return ray_bin


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (``ray start --head``), shared by every test; yields its address."""
    port = free_port()
    ray_bin = ray_cli()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                    "--num-cpus=2", "--num-gpus=0", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=180)
    yield f"127.0.0.1:{port}"
    subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)


def learnable_csv(path: Path, repeats: int = 6) -> Path:
    rows = ["text,label"] + [f'"{i}: {t}",{y}' for i in range(repeats) for t, y in TINY_DATA_ROWS]
    return write(path, "\n".join(rows) + "\n")


def tiny_study(train: Path, **over) -> dict:
    cfg = tiny_config(train)
    cfg.update({
        "search": {
            "approach": {"choice": ["head", "generation"]},
            "training.learning_rate": {"loguniform": [1e-3, 1e-2]},
            "lora.r": {"choice": [4, 8]},
            "head": {"head.class_weights": {"choice": ["none", "balanced"]}},
        },
        "scheduler": {"max_epochs": 4, "grace_period": 1, "reduction_factor": 2},
        "num_trials": 6, "max_concurrent_trials": 2, "resources_per_trial": {"cpu": 1},
    })
    cfg["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    for k, v in over.items():
        set_dotted(cfg, k, v)
    return cfg


@pytest.fixture(scope="session")
def finished_study(tmp_path_factory, ray_cluster, mlflow_server):
    """One study of 6 trials over both approaches with ASHA, shared by the tests that read it.

    Made so that ASHA must cut: trials run one at a time, the head approach learns the toy data in
    its first epoch at this learning rate while the tiny model's generation approach cannot, and
    the first trials take each approach once (head first)."""
    import yaml

    d = tmp_path_factory.mktemp("study")
    study = d / "study.yaml"
    cfg = tiny_study(learnable_csv(d / "d.csv", repeats=12), max_concurrent_trials=1,
                     **{"training.learning_rate": 1e-2})
    cfg["search"] = {"approach": {"choice": ["head", "generation"]}, "lora.r": {"choice": [4, 8]},
                     "head": {"head.class_weights": {"choice": ["none", "balanced"]}}}
    study.write_text(yaml.safe_dump(cfg))
    # imports ahead as on a GPU node (auto leaves them out on this CPU); the study test checks they ran
    p = run_cli("run", study, "--name", "both-approaches", "--address", ray_cluster, timeout=900,
                env={"QLORA_TUNE_IMPORT_AHEAD": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    from tuner.records import StudyRecord

    return StudyRecord.load("both-approaches")


@pytest.fixture(scope="session")
def promoted(finished_study):
    """The finished study's best trial, promoted to the registry as tiny-champion@champion."""
    p = run_cli("promote", finished_study.name, "--model-name", "tiny-champion")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return finished_study
