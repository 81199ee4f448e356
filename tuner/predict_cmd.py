"""``qlora-tune predict``: label and per-label probabilities for texts or a file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich.table import Table

from tuner.console import console
from tuner.io import atomic_write_table, read_texts
from tuner.refs import local_model_folder


def run_predict(ref: str, texts: list[str], input: Path | None, output: Path | None,
                text_column: str, generate: bool, batch_size: int | None) -> None:
    from trainables.predict import Classifier

    folder = local_model_folder(ref)
    df = None
    if input:
        df, texts = read_texts(input, text_column)
    clf = Classifier(folder, batch_size=batch_size)
    if generate and not clf.approach.can_generate:
        from trainables.errors import InputError

        raise InputError(f"--generate: approach {clf.cfg.approach} does not write text; use a generation model")
    pred = clf.predict(texts)
    recs = pd.DataFrame(pred.records())
    if generate:
        recs["completion"] = clf.generate(texts)
    if output:
        out = pd.concat([df.reset_index(drop=True), recs], axis=1)
        atomic_write_table(out, output)
        console.print(f"wrote {len(out)} predictions to {output}")
        return
    t = Table()
    t.add_column("text", overflow="fold", max_width=60)
    for c in recs.columns:
        t.add_column(c, justify="right" if c.startswith("p_") else "left")
    for text, (_, row) in zip(texts, recs.iterrows()):
        t.add_row(text, *(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row))
    console.print(t)
