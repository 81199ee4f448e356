"""``run --warm-start OLD``: an earlier study's trials, as MLflow recorded them, given to Optuna as
trials of the new study wherever the two search spaces agree (for tuning the same task again on new
data). A trial that ran to the end becomes a complete trial with its final value; one that ASHA
stopped a pruned trial with its per-epoch values, as the old study's Optuna saw them. The old study's
best trial of each approach is also the new study's first trial of that approach (enqueued, the best
of them first), so the configuration known to be best is measured on the new data before TPE explores."""

from __future__ import annotations

import math
from typing import NamedTuple

import pandas as pd

from trainables.errors import InputError
from tuner.searcher import mlflow_value, optuna_distribution
from tuner.study_config import SearchSpace, StudyConfig


class _Best(NamedTuple):
    """An old study's best trial of one approach, as the new study reruns it."""

    approach: str
    value: float  # the metric, signed so that larger is better
    params: dict  # its carried-over parameters
    wall_s: float
    epochs: int


def warm_trials(old, study: StudyConfig, space: SearchSpace) -> tuple[list, list[str], list[dict]]:
    """Optuna trials for ``study`` from the finished trials of study record ``old``, one line per
    parameter that could not be carried over (in full or for some trials), and the first trials: the
    carried-over parameters of ``old``'s best trial of each approach (the rest is sampled), best first:
    where fewer trials run at once than there are approaches, the best known configuration starts first."""
    import optuna

    from tuner.summary import study_rows

    if old.study.metric != study.metric or (old.study.mode or "") != (study.mode or ""):
        raise InputError(f"--warm-start {old.name}: it optimised {old.study.metric} ({old.study.mode}), this study "
                         f"{study.metric} ({study.mode}); their values do not compare")
    df = study_rows(old)
    approaches = space.approaches(study.approach)
    trials, outside, missing, other_approach = [], {}, {}, 0
    best: dict[str, _Best] = {}  # approach -> its best trial
    sign = 1 if study.mode == "max" else -1
    old_keys = {k for k in df.columns if "." in k or k == "approach"} if len(df) else set()
    for _, row in df.iterrows():
        history = [v for _, v in row["_history"] if not math.isnan(v)]
        if row["state"] not in ("completed", "stopped_early") or not history:
            continue
        approach = row.get("approach") or old.study.approach
        if approach not in approaches:
            other_approach += 1
            continue
        params, dists = {}, {}
        for name, key, d in space.parameters(approach):
            raw = approach if key == "approach" else row.get(key)
            if not isinstance(raw, str):
                missing[key] = missing.get(key, 0) + 1
                continue
            try:
                v = mlflow_value(raw, d)
            except ValueError:
                v = None
            if v is None or not d.admits(v):
                outside[key] = outside.get(key, 0) + 1
                continue
            params[name], dists[name] = v, optuna_distribution(d)
        if row["state"] == "completed":
            trial = optuna.trial.create_trial(params=params, distributions=dists, value=history[-1])
        else:
            trial = optuna.trial.create_trial(params=params, distributions=dists, state=optuna.trial.TrialState.PRUNED,
                                              intermediate_values=dict(enumerate(history, 1)))
        trials.append(trial)
        value = sign * row[f"best_{study.metric}"]
        if approach not in best or value > best[approach].value:
            best[approach] = _Best(approach, value, params, float(row.get("wall_seconds", 0.0)),
                                   int(row.get("epochs", 0)))
    notes = [f"{k}: not searched by {old.name} ({n} trial(s) carried over without it)" for k, n in missing.items()]
    notes += [f"{k}: outside this space in {n} trial(s) (carried over without it)" for k, n in outside.items()]
    dropped = sorted(old_keys - {k for k in space.common} - {k for b in space.blocks.values() for k in b}
                     - {"approach"})
    notes += [f"{k}: not in this space (the old values are ignored)" for k in dropped if _searched(df, k)]
    if other_approach:
        notes.append(f"approach: {other_approach} trial(s) of approaches this study does not search were left out")
    ranked = sorted((b for b in best.values() if b.params), key=lambda b: -b.value)
    budget = study.time_budget_s
    notes += [f"{b.approach}: {old.name}'s best trial ran {b.wall_s:.0f} s for "
              f"{b.epochs} epoch(s); within time_budget_s {budget:g} its rerun may be cut before then"
              for b in ranked[:1] if budget and b.wall_s > budget]
    return trials, notes, [b.params for b in ranked]


def _searched(df: pd.DataFrame, key: str) -> bool:
    return key in df.columns and df[key].notna().any()
