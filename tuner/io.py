"""Atomic file writes and reading text inputs for prediction."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd

from trainables.data import read_table
from trainables.errors import InputError


def atomic_write_table(df: pd.DataFrame, path: Path) -> None:
    """Write CSV/TSV/JSONL/Parquet by suffix into a temp file, then rename: no partial outputs."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl", ".parquet"):
        raise InputError(f"{path}: output must end in .csv, .tsv, .jsonl or .parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        if suffix == ".csv":
            df.to_csv(tmp, index=False)
        elif suffix == ".tsv":
            df.to_csv(tmp, index=False, sep="\t")
        elif suffix == ".jsonl":
            df.to_json(tmp, orient="records", lines=True, force_ascii=False)
        else:
            df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_texts(path: Path, column: str) -> tuple[pd.DataFrame, list[str]]:
    df = read_table(Path(path))
    if column not in df.columns:
        raise InputError(f"{path}: no text column '{column}' (columns: {', '.join(map(str, df.columns[:20]))}); pass --text-column")
    texts = []
    for i, v in enumerate(df[column].tolist(), 1):
        if not isinstance(v, str) or not v.strip():
            raise InputError(f"{path}: row {i}: column '{column}' is empty or not text")
        texts.append(v)
    return df, texts
