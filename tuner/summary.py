"""What a study looks like: the live table, one-line trial reports, the trials table read back from
MLflow, and the report files of a finished study. Nothing here changes a run's state."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pandas as pd
from rich.table import Table

from trainables import layout as L
from trainables import params as P
from trainables import runs as R
from trainables.errors import OOM_REASON
from tuner import importance, storage
from tuner.console import console

SHOWN = ("training.learning_rate", "lora.r", "training.batch_size")
TIME_PARTS = {"train_seconds_total": "training", "graphs_seconds_total": "graph_capture",
              "eval_seconds_total": "evaluation", "setup_seconds": "setup",
              "checkpoint_seconds_total": "checkpoints", "final_report_seconds": "final_report"}
"""Where a trial's time goes, as its run logs it (graph capture: the CUDA graphs' warm-up steps and
captures, which the run counts inside its training seconds and the shares take out of training;
checkpoints: writing and reporting each epoch's, up to the last one logged; final report: the
selected adapter evaluated on every split and written);
the rest is logging, Ray's bookkeeping, the last checkpoint and work cut short (by ASHA or the
budget) before it was reported."""


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if (abs(v) < 1e-2 or abs(v) >= 1e4) and v != 0 else f"{v:.4f}".rstrip("0").rstrip(".")
    return "" if v is None else str(v)


def live_table(trials, metric: str, mode: str, max_epochs: int) -> Table:
    """Trials table from Ray's Trial objects (state, approach, key parameters, epochs, metric)."""
    t = Table(title=f"trials ({metric}, {mode})", title_justify="left")
    for col in ("trial", "state", "approach", "lr", "r", "batch", "epochs", metric):
        t.add_column(col)
    for tr in trials:
        cfg = P.from_trial(tr.config)
        res = tr.last_result or {}
        t.add_row(tr.trial_id, tr.status.lower(), str(cfg.get("approach", "")),
                  *(_fmt(cfg.get(k)) for k in SHOWN),
                  f"{res.get('epoch', 0)}/{max_epochs}", _fmt(res.get(metric)))
    return t


def trial_line(trial, what: str, metric: str, max_epochs: int) -> str:
    """``trial 1a2b3c4d (head, lr=0.0003, r=16, batch=16) completed: epoch 3/3, eval_f1_macro 0.91``."""
    cfg = P.from_trial(trial.config)
    params = ", ".join(f"{k.rpartition('.')[2].replace('learning_rate', 'lr').replace('batch_size', 'batch')}="
                       f"{_fmt(cfg[k])}" for k in SHOWN if k in cfg)
    res = trial.last_result or {}
    tail = f": epoch {res['epoch']}/{max_epochs}, {metric} {_fmt(res.get(metric))}" if res.get("epoch") else ""
    return f"trial {trial.trial_id} ({cfg.get('approach', '')}{', ' + params if params else ''}) {what}{tail}"


START_PARTS = {"load": "config and data", "ray": "Ray", "gpu_auto": "gpu: auto fit", "tracking": "MLflow",
               "trial_start": "first trial's process", "trial_process": "waiting for the first trial's process",
               "trial_schedule": "Tune handing it the trial", "trial_imports": "the trial's imports until its run opened"}
"""How ``status`` names the parts of :func:`before_first_trial`."""


def study_rows(rec) -> pd.DataFrame:
    """One row per trial run of the study, straight from MLflow."""
    c = R.client(rec.tracking_uri)
    study = rec.study
    rows = []
    for run in R.find_runs(c, rec.experiment_id, rec.name, "trial", parent_run_id=rec.parent_run_id):
        hist = c.get_metric_history(run.info.run_id, study.metric)
        by_step = {m.step: m.value for m in hist}
        values = [by_step[s] for s in sorted(by_step)]
        best = (max if study.mode == "max" else min)(values) if values else math.nan
        row = {
            "trial_id": run.data.tags.get(R.TRIAL_TAG), "run_id": run.info.run_id,
            "state": run.data.tags.get(R.STATE_TAG, "?"), "status": run.info.status,
            "approach": run.data.tags.get("approach"), "epochs": max(by_step) if by_step else 0,
            f"last_{study.metric}": values[-1] if values else math.nan, f"best_{study.metric}": best,
            "gpu_seconds": run.data.metrics.get("gpu_seconds", 0.0),
            "wall_seconds": ((run.info.end_time or time.time() * 1000) - run.info.start_time) / 1000,
            "start_time": run.info.start_time / 1000,
            "process_started": float(run.data.tags.get(R.PROCESS_STARTED_TAG, "nan")),
            "entered": float(run.data.tags.get(R.ENTERED_TAG, "nan")),
            **{k: run.data.metrics.get(k, 0.0) for k in TIME_PARTS},
            "reason": run.data.tags.get(R.REASON_TAG, ""),
            "cuda_graphs_failed": run.data.tags.get(R.GRAPHS_FAILED_TAG, ""),
        }
        row.update(P.from_mlflow(run.data.params))
        row["_history"] = [(s, by_step[s]) for s in sorted(by_step)]
        rows.append(row)
    df = pd.DataFrame(rows)
    return df.sort_values("trial_id").reset_index(drop=True) if len(df) else df


def best_row(rec, df: pd.DataFrame):
    col = f"best_{rec.study.metric}"
    ok = df[df[col].notna()] if len(df) else df
    if not len(ok):
        return None
    return ok.loc[ok[col].idxmax() if rec.study.mode == "max" else ok[col].idxmin()]


def plot_metric_by_epoch(rec, df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for _, r in df.iterrows():
        h = r["_history"]
        if not h:
            continue
        xs, ys = zip(*h)
        color = {"stopped_early": "tab:red", "errored": "tab:gray"}.get(r["state"], "tab:blue")
        ax.plot(xs, ys, "-", color=color, alpha=0.6)
        ax.plot(xs[-1], ys[-1], "x" if r["state"] == "stopped_early" else "o", color=color, ms=8)
    ax.set_xlabel("epoch")
    ax.set_ylabel(rec.study.metric)
    ax.set_title(f"{rec.name}: {rec.study.metric} by epoch (x = stopped by ASHA, o = ran to the end)")
    ax.set_xticks(range(1, rec.study.scheduler.max_epochs + 1))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def time_in_trials(df: pd.DataFrame) -> dict:
    """Seconds the trials' runs lasted, summed (``seconds``), and each part's share of them
    (``shares``: :data:`TIME_PARTS` and ``other``); empty when no run lasted."""
    total = float(df["wall_seconds"].sum()) if len(df) else 0.0
    if total <= 0:
        return {}
    parts = {name: float(df[k].sum()) for k, name in TIME_PARTS.items()}
    parts["training"] -= parts["graph_capture"]
    parts["other"] = max(0.0, total - sum(parts.values()))
    return {"seconds": total, "shares": {name: v / total for name, v in parts.items()}}


def before_first_trial(rec, df: pd.DataFrame) -> dict:
    """Seconds from the CLI's start to the first trial's run (``seconds``), by part (``parts``): the
    driver's steps (:attr:`StudyRecord.start_phases`), then ``trial_start``, Ray Tune starting the
    first trial's process until its run opens, in three where the run says when its process started
    and its function began: ``trial_process`` (waiting for a process: none where Ray had one ready),
    ``trial_schedule`` (Tune handing the process the trial) and ``trial_imports`` (the function's
    imports and data until the run opened). Empty for a study recorded without them."""
    if not rec.start_phases:
        return {}
    parts = dict(rec.start_phases)
    if rec.trials_started and len(df):
        first = df.loc[df["start_time"].idxmin()]
        t0, opened = rec.trials_started, float(first["start_time"])
        began, entered = first.get("process_started", math.nan), first.get("entered", math.nan)
        if t0 <= entered <= opened and began <= entered:
            began = max(began, t0)
            parts.update(trial_process=began - t0, trial_schedule=entered - began, trial_imports=opened - entered)
        else:
            parts["trial_start"] = max(0.0, opened - t0)
    return {"seconds": sum(parts.values()), "parts": parts}


def compute_summary(rec, df: pd.DataFrame) -> dict:
    """The study's figures: states, compute, storage (a walk of the study's storage) and parameter
    importances (a fANOVA fit). Computed once per report: pass it on rather than computing it again."""
    s = rec.study
    epochs = int(df["epochs"].sum()) if len(df) else 0
    budget = len(df) * s.scheduler.max_epochs  # the trials run, each to max_epochs
    counts = df["state"].value_counts().to_dict() if len(df) else {}
    oom = int(df["reason"].fillna("").str.startswith(OOM_REASON).sum()) if len(df) else 0
    try:
        sizes = list(storage.bytes_by_trial(rec.experiment_path).values())
    except OSError:  # storage out of reach (a bucket without credentials here)
        sizes = []
    failed = df["cuda_graphs_failed"].fillna("") if len(df) else pd.Series(dtype=str)
    return {"trials": len(df), "states": counts, "out_of_gpu_memory": oom, "time_in_trials": time_in_trials(df),
            "before_first_trial": before_first_trial(rec, df),
            "cuda_graphs_failed": {"trials": int((failed != "").sum()), "first_reason": next((r for r in failed if r), "")},
            "storage_bytes": sum(sizes), "storage_bytes_per_trial_max": max(sizes, default=0),
            "epochs_run": epochs, "epochs_without_early_stopping": budget,
            "compute_saved": 1 - epochs / budget if budget else 0.0,
            "gpu_hours": float(df["gpu_seconds"].sum()) / 3600 if len(df) else 0.0,
            "param_importances": importance.importances(rec, df)}


def write_study_report(rec, df: pd.DataFrame, summary: dict, seconds: float, folder: Path) -> dict[str, float]:
    """The study's report files in ``folder`` (``trials.csv``, ``metric_by_epoch.png``, the importance
    plots, ``summary.json``, the best trial's config); returns the study's headline metrics."""
    best = best_row(rec, df)
    if len(df):
        df.drop(columns=["_history"]).to_csv(folder / "trials.csv", index=False)
        plot_metric_by_epoch(rec, df, folder / "metric_by_epoch.png")
        importance.write_plots(rec, df, folder)
    (folder / "summary.json").write_text(json.dumps({**summary, "seconds": seconds}, indent=2))
    metrics = {"epochs_run": summary["epochs_run"], "compute_saved": summary["compute_saved"],
               "gpu_hours": summary["gpu_hours"], "wall_seconds": seconds,
               "storage_bytes": summary["storage_bytes"], "out_of_gpu_memory_trials": summary["out_of_gpu_memory"],
               "cuda_graphs_failed_trials": summary["cuda_graphs_failed"]["trials"]}
    shares = (summary.get("time_in_trials") or {}).get("shares", {})
    metrics.update({f"trial_time_share_{name}": v for name, v in shares.items()})
    start = summary.get("before_first_trial") or {}
    if start:
        metrics["before_first_trial_seconds"] = start["seconds"]
        metrics.update({f"before_first_trial_{name}_seconds": v for name, v in start["parts"].items()})
    if best is not None:
        metrics[f"best_{rec.study.metric}"] = float(best[f"best_{rec.study.metric}"])
        try:
            got = R.client(rec.tracking_uri).download_artifacts(
                best["run_id"], f"{L.RUN_MODEL_ARTIFACT}/{L.CONFIG}", str(folder))
            Path(got).rename(folder / L.BEST_CONFIG)
        except Exception:  # noqa: BLE001 - the best trial has no model folder yet
            pass
    return metrics


def print_status(rec, df: pd.DataFrame | None = None, summary: dict | None = None) -> None:
    s = rec.study
    df = study_rows(rec) if df is None else df
    summary = summary or compute_summary(rec, df)
    t = Table(title=f"study {rec.name} ({rec.state})", title_justify="left")
    shown = [k for k in SHOWN if k in df.columns]
    cols = ["trial_id", "state", "approach", *shown, "epochs", f"best_{s.metric}", "gpu_seconds", "reason"]
    for col in cols:
        t.add_column(col.removeprefix("training.").removeprefix("lora."))
    for _, r in df.iterrows():
        t.add_row(*(_fmt(r.get(col)) if not isinstance(r.get(col), float) or not math.isnan(r.get(col)) else ""
                    for col in cols))
    console.print(t)
    best = best_row(rec, df)
    if best is not None:
        params = {k: best[k] for k in df.columns if ("." in k or k == "approach") and isinstance(best[k], str)}
        from tuner.tracking import run_link

        console.print(f"[bold]best trial[/]: {best['trial_id']} ({best['approach']}), "
                      f"{s.metric} {best[f'best_{s.metric}']:.4f} after {best['epochs']} epochs; run "
                      f"{run_link(rec.tracking_uri, rec.experiment_id, best['run_id']) or best['run_id']}", soft_wrap=True)
        console.print("  " + ", ".join(f"{k}={v}" for k, v in sorted(params.items())))
    top = list(summary["param_importances"].items())[:3]
    if top:
        console.print("[bold]most important[/] (fANOVA over the trials' best values): "
                      + ", ".join(f"{k} {v:.2f}" for k, v in top), soft_wrap=True)
    console.print(f"[bold]compute[/]: {summary['epochs_run']} epochs run of {summary['epochs_without_early_stopping']} "
                  f"without early stopping (saved {summary['compute_saved']:.0%}); "
                  f"GPU-hours {summary['gpu_hours']:.3f}; states {summary['states']}"
                  + (f"; {summary['out_of_gpu_memory']} ran {OOM_REASON}" if summary["out_of_gpu_memory"] else ""),
                  soft_wrap=True)
    eager = summary.get("cuda_graphs_failed") or {}
    if eager.get("trials"):
        console.print(f"[yellow]cuda graphs[/]: {eager['trials']} trial(s) trained with eager steps after a "
                      f"failed capture ({eager['first_reason']}); set training.cuda_graphs: false to skip trying",
                      soft_wrap=True)
    spent = summary.get("time_in_trials") or {}
    if spent:
        console.print(f"[bold]time in trials[/]: {spent['seconds']:,.0f} s: "
                      + ", ".join(f"{name.replace('_', ' ')} {v:.0%}" for name, v in spent["shares"].items()
                                  if v > 0 or name == "other")  # no graph capture on a CPU, say
                      + " (other: logging, Ray, the last checkpoint, epochs cut short)", soft_wrap=True)
    start = summary.get("before_first_trial") or {}
    if start:
        console.print(f"[bold]before the first trial[/]: {start['seconds']:,.0f} s: "
                      + ", ".join(f"{START_PARTS.get(name, name)} {v:,.1f} s" for name, v in start["parts"].items()),
                      soft_wrap=True)
    if summary["storage_bytes"]:
        console.print(f"[bold]storage[/]: {summary['storage_bytes'] / 1e6:.1f} MB of checkpoints and state in "
                      f"{rec.experiment_path} (at most {summary['storage_bytes_per_trial_max'] / 1e6:.1f} MB per "
                      f"trial; stopped trials keep none)", soft_wrap=True)
    from tuner.tracking import runs_link

    link = runs_link(rec.tracking_uri, rec.experiment_id, rec.name)
    console.print(f"[bold]MLflow[/]: {link or rec.tracking_uri} (parent run {rec.parent_run_id})", soft_wrap=True)
