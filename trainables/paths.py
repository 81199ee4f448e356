"""Where qlora-tune keeps state: converted models, the embedded MLflow store, studies."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def home() -> Path:
    """``$QLORA_TUNE_HOME``, else ``~/.cache/qlora-tune``."""
    p = Path(os.environ.get("QLORA_TUNE_HOME") or Path.home() / ".cache" / "qlora-tune")
    p.mkdir(parents=True, exist_ok=True)
    return p


def models_dir() -> Path:
    p = home() / "models"
    p.mkdir(parents=True, exist_ok=True)
    return p


def build_atomically(final: Path, build: Callable[[Path], None]) -> Path:
    """Build a folder in a temporary sibling, then rename it into place: no reader ever sees a
    half-written folder, and a failed build leaves nothing behind."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
