"""Shared fixtures: one state home per test session (model cache, MLflow store, Ray), helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "twitter-financial-news"
ARTIFACTS = ROOT / "test-artifacts"

# One cache for the whole session (and across sessions locally): converted models are reused.
os.environ.setdefault("QLORA_TUNE_HOME", str(ROOT / ".state" / "test-home"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tuner.console import quiet_libraries  # noqa: E402

quiet_libraries()


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
    rows = ["text,label"] + [f'"{i}: {t}",{y}' for i in range(6) for t, y in TINY_DATA_ROWS]
    return write(tmp_path / "tiny.csv", "\n".join(rows) + "\n")


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
        node = cfg
        parts = k.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return cfg


@pytest.fixture
def yaml_file(tmp_path):
    import yaml

    def make(cfg: dict, name: str = "config.yaml") -> Path:
        return write(tmp_path / name, yaml.safe_dump(cfg))

    return make
