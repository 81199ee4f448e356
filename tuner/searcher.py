"""Optuna TPE behind Ray Tune, with the search space defined by run (conditional per approach).

ASHA-stopped trials reach Ray's OptunaSearch as COMPLETE with the value of the rung where they
were cut, so TPE would learn from truncated results as if they were final. This searcher tells
Optuna such trials were PRUNED instead (their per-epoch values are already reported as
intermediate values), which is exactly how Optuna treats trials its own pruners stop: TPE ranks
complete trials by value and puts pruned ones after them, ordered by how far they got.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any, Callable

from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from trainables import compat
from trainables import params as P
from trainables.config import get_dotted
from tuner.console import console
from tuner.study_config import Distribution, SearchSpace


def _suggest(trial, name: str, d: Distribution) -> None:
    if d.kind == "choice":
        trial.suggest_categorical(name, [P.encode(c) for c in d.choice])
    elif d.kind == "loguniform":
        trial.suggest_float(name, *d.loguniform, log=True)
    elif d.kind == "uniform":
        trial.suggest_float(name, *d.uniform)
    else:
        trial.suggest_int(name, *d.int, log=d.log)


def optuna_distribution(d: Distribution):
    """The Optuna distribution that :class:`DefineByRun` samples ``d`` from."""
    import optuna.distributions as od

    if d.kind == "choice":
        return od.CategoricalDistribution([P.encode(c) for c in d.choice])
    if d.kind == "int":
        return od.IntDistribution(*d.int, log=d.log)
    lo, hi = getattr(d, d.kind)
    return od.FloatDistribution(lo, hi, log=d.kind == "loguniform")


def mlflow_value(raw: str, d: Distribution):
    """A parameter as MLflow holds it (a string) back to its value in the Optuna distribution."""
    if d.kind == "choice":
        for c in d.choice:
            if raw == (json.dumps(c) if isinstance(c, (list, tuple)) else str(c)):
                return P.encode(c)
        raise ValueError(raw)
    return int(raw) if d.kind == "int" else float(raw)


class DefineByRun:
    """Optuna define-by-run space (picklable: Ray saves the searcher with the study state).
    Parameter names and values as :mod:`trainables.params` defines them."""

    def __init__(self, space: SearchSpace, fixed_approach: str):
        self.space, self.fixed_approach = space, fixed_approach

    def __call__(self, trial) -> dict[str, Any] | None:
        space, approach = self.space, self.fixed_approach
        if "approach" in space.common:
            approach = trial.suggest_categorical("approach", [str(a) for a in space.common["approach"].choice])
        for name, key, d in space.parameters(approach):
            if key != "approach":
                _suggest(trial, name, d)
        return None


class PruningAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that reports ASHA-stopped trials to Optuna as PRUNED (see module docstring).

    With a ``time_budget_s`` it also starts no trial that could not report once before the budget
    ends: once the time left is under the median time trials took to their first report, it tells
    Tune the search is finished, and the running trials keep the GPUs to themselves. (A trial cut
    before its first epoch only takes a share of the cards from those that would have finished one.)"""

    def __init__(self, *args, max_epochs: int, time_budget_s: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._max_epochs = max_epochs
        self._budget_s = time_budget_s
        self._first_report_s: list[float] = []
        self._clock: float | None = None  # when this process first asked for a trial (Tune's budget starts then)

    def _seconds_left(self) -> float | None:
        return None if self._budget_s is None or self._clock is None else self._budget_s - (time.monotonic() - self._clock)

    def suggest(self, trial_id: str):
        if self._clock is None:
            self._clock = time.monotonic()
        left = self._seconds_left()
        if left is not None and self._first_report_s:
            need = statistics.median(self._first_report_s)
            if left < need:
                console.print(f"time budget: no new trials in the last {left:.0f} s (trials took {need:.0f} s to "
                              "their first epoch)", soft_wrap=True)
                return Searcher.FINISHED
        return super().suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict):
        if result.get("epoch") == 1 and "time_total_s" in result:
            self._first_report_s.append(float(result["time_total_s"]))
        super().on_trial_result(trial_id, result)

    def restore(self, checkpoint_path: str):
        super().restore(checkpoint_path)
        self._clock = None  # a resumed study's budget starts again

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        stopped_early = not error and result and result.get("epoch", self._max_epochs) < self._max_epochs
        if stopped_early and trial_id not in self._completed_trials and compat.tell_optuna_pruned(self, trial_id):
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)


def first_points(space: SearchSpace, fixed_approach: str, base: Callable[[str], dict]) -> list[dict] | None:
    """The study's first trials, one per approach searched (so no study misses an approach by sampling
    luck): each runs the study's own settings (by
    default the QLoRA recipe: learning rate 2e-4, LoRA r 16, alpha 32, dropout 0.05 on every linear
    layer) wherever the space admits them, so a known-good configuration is measured before TPE
    explores. ``base(approach)`` is the run config tree of that approach; a parameter whose setting
    lies outside its searched range is sampled."""
    points = []
    for approach in space.approaches(fixed_approach):
        tree, point = base(approach), {}
        for name, key, d in space.parameters(approach):
            value = approach if key == "approach" else get_dotted(tree, key)
            if d.admits(value):
                point[name] = P.encode(value) if d.kind == "choice" else value
        points.append(point)
    return points if any(points) else None


def make_searcher(space: SearchSpace, fixed_approach: str, seed: int, num_trials: int, max_epochs: int,
                  metric: str, mode: str, warm_trials: list = (), first: list[dict] | None = None,
                  time_budget_s: float | None = None):
    """``first``: the first trials' parameters (:func:`first_points`), handed out before TPE samples.
    ``warm_trials``: Optuna trials of an earlier study (:mod:`tuner.warm_start`), known to TPE from
    the start: they go into the study that Ray's OptunaSearch loads."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(
        seed=seed, multivariate=True, group=True, constant_liar=True,
        n_startup_trials=max(2, min(10, num_trials // 3)),
    )
    storage = name = None
    if warm_trials:
        storage, name = optuna.storages.InMemoryStorage(), "warm-started"
        optuna.create_study(storage=storage, study_name=name,
                            direction="minimize" if mode == "min" else "maximize").add_trials(list(warm_trials))
    return PruningAwareOptunaSearch(space=DefineByRun(space, fixed_approach), sampler=sampler,
                                    metric=metric, mode=mode, max_epochs=max_epochs, points_to_evaluate=first,
                                    storage=storage, study_name=name, time_budget_s=time_budget_s)
