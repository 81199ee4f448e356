"""Sampled parameters: how the search names and encodes them, and how trials and reports read them.

* **Names.** A parameter searched for every trial is named by its dotted run-config key
  (``training.learning_rate``); one searched only for one approach's trials is ``<approach>:<key>``
  (``head:head.class_weights``), so Optuna sees a conditional space.
* **Values.** Optuna's categoricals must be scalars: lists and dicts travel as ``json:`` strings.
* **In MLflow** a trial's sampled values are params ``search.<key>``.
"""

from __future__ import annotations

import json
from typing import Any

APPROACH_SEP = ":"
JSON_PREFIX = "json:"
MLFLOW_PREFIX = "search."


def sampled_name(key: str, approach: str | None = None) -> str:
    """The name the searcher gives ``key`` (per-approach keys carry their approach)."""
    return f"{approach}{APPROACH_SEP}{key}" if approach else key


def encode(value: Any) -> Any:
    """A value as an Optuna categorical choice (scalars as they are, the rest as JSON)."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else JSON_PREFIX + json.dumps(value)


def decode(value: Any) -> Any:
    return json.loads(value[len(JSON_PREFIX):]) if isinstance(value, str) and value.startswith(JSON_PREFIX) else value


def from_trial(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's sampled parameters (Ray's config dict) as ``{config.key: value}``: approach
    prefixes dropped, any nesting Ray applied undone, values decoded."""
    out: dict[str, Any] = {}
    for name, value in config.items():
        if isinstance(value, dict):
            out.update(from_trial(value))
        else:
            out[name.split(APPROACH_SEP, 1)[-1]] = decode(value)
    return out


def to_mlflow(params: dict[str, Any]) -> dict[str, Any]:
    """Sampled parameters as the trial run's params (``search.<key>``)."""
    return {MLFLOW_PREFIX + k: v for k, v in params.items()}


def from_mlflow(run_params: dict[str, str]) -> dict[str, str]:
    """The sampled parameters among a run's params, by config key."""
    return {k.removeprefix(MLFLOW_PREFIX): v for k, v in run_params.items() if k.startswith(MLFLOW_PREFIX)}
