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


def downloads_dir() -> Path:
    """Model folders fetched from MLflow or shipped to Ray workers, one per immutable source
    (:func:`cached_folder`); delete it to free the space."""
    p = home() / "downloads"
    p.mkdir(parents=True, exist_ok=True)
    return p


def cached_folder(final: Path, build: Callable[[Path], None]) -> Path:
    """``final``, built once by ``build(tmp)`` and renamed into place; a folder already there is
    used as it is (its source is immutable), and a concurrent builder that renamed first wins. Unlike
    :func:`build_atomically`, nothing a reader may hold is ever replaced."""
    final = Path(final)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


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


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling, then rename it into place: a reader sees the old file
    or the new one, never half of one (concurrent writers each rename a whole file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
