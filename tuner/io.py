"""Atomic file writes and reading text inputs for prediction."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import pandas as pd

from trainables.data import read_table
from trainables.errors import InputError


OUTPUT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")


def check_output_path(path: Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise InputError(f"{path}: output must end in .csv, .tsv, .jsonl or .parquet")
    return path


@contextlib.contextmanager
def atomic_table_writer(path: Path):
    """Yield ``write(df)``, which appends a chunk of rows to a table written by suffix
    (CSV/TSV/JSONL/Parquet) into a temporary file; renamed into place only when the block ends
    without an error: no partial outputs."""
    path = check_output_path(path)
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    state: dict = {"first": True, "parquet": None}

    def write(df: pd.DataFrame) -> None:
        first = state["first"]
        state["first"] = False
        if suffix in (".csv", ".tsv"):
            df.to_csv(tmp, index=False, sep="\t" if suffix == ".tsv" else ",", mode="w" if first else "a",
                      header=first)
        elif suffix == ".jsonl":
            df.to_json(tmp, orient="records", lines=True, force_ascii=False, mode="w" if first else "a")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(df, preserve_index=False)
            if state["parquet"] is None:
                state["parquet"] = pq.ParquetWriter(tmp, table.schema)
            state["parquet"].write_table(table.cast(state["parquet"].schema))

    try:
        yield write
        if state["parquet"] is not None:
            state["parquet"].close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_table(df: pd.DataFrame, path: Path) -> None:
    """Write CSV/TSV/JSONL/Parquet by suffix into a temp file, then rename: no partial outputs."""
    with atomic_table_writer(path) as write:
        write(df)


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
