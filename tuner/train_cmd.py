"""``qlora-tune train``: one fine-tuning run with progress and a summary table."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from trainables.config import load_config
from trainables.data import load_dataset
from trainables.metrics import METRICS
from tuner.console import console


def run_train(config: Path, overrides: list[str], out: Path, overwrite: bool) -> Path:
    from trainables.errors import InputError

    cfg = load_config(config, overrides)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out}: output folder exists and is not empty (pass --overwrite)")
    data = load_dataset(cfg.data)
    sizes = ", ".join(f"{k} {len(v)}" for k, v in data.splits().items())
    console.print(f"[bold]data[/]: {sizes}; labels {data.label_names}")
    from trainables.loop import Trainer

    with console.status(f"loading {cfg.model} ({cfg.quantization}, approach {cfg.approach})"):
        trainer = Trainer(cfg, data, log=console.print)
    console.print(f"[bold]model[/]: {cfg.model} on {trainer.dev.type}, "
                  f"{sum(p.numel() for p in trainer.trainable):,} trainable parameters, "
                  f"loaded in {trainer.setup_seconds:.1f}s")
    result = trainer.fit()
    trainer.save_output(out, result, overwrite=overwrite)
    console.print(summary_table(result.final, result.best_epoch))
    console.print(f"[bold]output[/]: {out}")
    return out


def summary_table(final: dict[str, dict], best_epoch: int) -> Table:
    t = Table(title=f"final metrics (adapter of epoch {best_epoch})")
    t.add_column("split")
    for m in (*METRICS, "loss"):
        t.add_column(m, justify="right")
    for split, rep in final.items():
        t.add_row(split, *(f"{rep[m]:.4f}" for m in (*METRICS, "loss")))
    return t
