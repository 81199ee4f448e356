"""What mattered in a study: Optuna's parameter importances (fANOVA) and parallel-coordinate plot,
computed from the trials as MLflow recorded them (their best value of the study's metric, including
trials stopped early or cut by the time budget)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd

from tuner.searcher import mlflow_value, optuna_distribution
from tuner.study_config import parse_search


def optuna_study(rec, df: pd.DataFrame):
    """An in-memory Optuna study holding the study's trials that reached a value (None if fewer than two)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = parse_search(rec.study, rec.name)
    dists = {**space.common, **{k: d for block in space.blocks.values() for k, d in block.items()}}
    col = f"best_{rec.study.metric}"
    study = optuna.create_study(direction="maximize" if rec.study.mode == "max" else "minimize")
    for _, row in df.iterrows():
        if pd.isna(row.get(col)):
            continue
        params, used = {}, {}
        for key, d in dists.items():
            raw = row.get(key)
            if isinstance(raw, str):
                try:
                    params[key], used[key] = mlflow_value(raw, d), optuna_distribution(d)
                except ValueError:
                    pass
        study.add_trial(optuna.trial.create_trial(params=params, distributions=used, value=float(row[col])))
    return study if len(study.trials) >= 2 else None


def importances(rec, df: pd.DataFrame) -> dict[str, float]:
    """Parameter -> importance (fANOVA, sums to 1), most important first; empty when not computable
    (fewer than two trials with a value, or no parameter that every one of them has and that varies)."""
    import optuna

    study = optuna_study(rec, df)
    if study is None:
        return {}
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)).items()}
    except (RuntimeError, ValueError, ZeroDivisionError):  # nothing varies across the trials
        return {}


def write_plots(rec, df: pd.DataFrame, folder: Path) -> list[str]:
    """``param_importances.png`` and ``parallel_coordinate.png`` (Optuna's matplotlib plots) in ``folder``;
    returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    study = optuna_study(rec, df)
    if study is None:
        return []
    written = []
    plots = {"param_importances.png": lambda: optuna.visualization.matplotlib.plot_param_importances(
                 study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)),
             "parallel_coordinate.png": lambda: optuna.visualization.matplotlib.plot_parallel_coordinate(study)}
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
                ax = plot()
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(9, 5)
            fig.tight_layout()
            fig.savefig(folder / name, dpi=110)
            plt.close(fig)
            written.append(name)
        except (RuntimeError, ValueError, ZeroDivisionError):  # too few trials or nothing varies
            plt.close("all")
    return written
