"""Where qlora-tune keeps state: converted models, the embedded MLflow store, studies."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """``$QLORA_TUNE_HOME``, else ``~/.cache/qlora-tune``."""
    p = Path(os.environ.get("QLORA_TUNE_HOME") or Path.home() / ".cache" / "qlora-tune")
    p.mkdir(parents=True, exist_ok=True)
    return p


def models_dir() -> Path:
    p = home() / "models"
    p.mkdir(parents=True, exist_ok=True)
    return p
