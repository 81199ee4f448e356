"""Model references for ``predict``/``serve``: an output folder, ``runs:/...`` or ``models:/...``."""

from __future__ import annotations

from pathlib import Path

from trainables.errors import InputError


def local_model_folder(ref: str) -> Path:
    """A local folder holding the output-folder layout for ``ref``."""
    if ref.startswith(("runs:/", "models:/")):
        from tuner.registry import download_model_folder

        return download_model_folder(ref)
    p = Path(ref)
    if not p.is_dir():
        raise InputError(f"--model {ref}: no such folder (give an output folder, runs:/RUN_ID/model or models:/NAME@ALIAS)")
    return p
