"""Defaults that adapt to the study's data: what a study file leaves out is decided here, once, before
Ray starts, and recorded with the study (its config in MLflow shows the resolved values).

* ``scheduler`` left out: the longest trials get about :data:`TARGET_STEPS` optimizer steps, so
  ``max_epochs`` follows the training rows and the (typical) batch size, between 2 and 8 epochs; ASHA's
  rungs (1, 2, 4, ... epochs) follow from it. Few rows get more epochs, many rows fewer.
* ``num_trials`` left out: 8, or, with ``time_budget_s``, as many as the budget allows (the budget
  ends the study, not a trial count picked without knowing how fast trials run).
* The first trial of each approach runs the study's own settings (:func:`tuner.searcher.first_points`).
"""

from __future__ import annotations

import math
import statistics

from tuner.console import console
from tuner.study_config import SchedulerSettings, SearchSpace, StudyConfig

TARGET_STEPS = 1000
"""Optimizer steps for a trial that runs to ``max_epochs`` (LoRA classification fine-tunes settle within
a few hundred to a few thousand steps)."""
EPOCH_BOUNDS = (2, 8)
BUDGETED_TRIALS = 10_000
"""``num_trials`` of a study with a time budget and no trial count: more than any budget runs."""


def typical_batch(study: StudyConfig, space: SearchSpace) -> int:
    """Examples per optimizer step of a typical trial: the median searched batch size (else the
    study's) times the gradient accumulation."""
    d = space.common.get("training.batch_size")
    if d is not None and d.kind == "choice":
        batch = int(statistics.median_low(sorted(int(c) for c in d.choice)))
    elif d is not None and d.kind == "int":
        batch = int(round(math.sqrt(d.int[0] * d.int[1])))
    else:
        batch = study.training.batch_size
    return batch * study.training.grad_accum


def adaptive_max_epochs(train_rows: int, batch: int) -> int:
    steps_per_epoch = max(1, math.ceil(train_rows / max(1, batch)))
    lo, hi = EPOCH_BOUNDS
    return max(lo, min(hi, math.ceil(TARGET_STEPS / steps_per_epoch)))


def adapt(study: StudyConfig, space: SearchSpace, train_rows: int) -> StudyConfig:
    """``study`` with the defaults it left out decided for its data (see the module docstring)."""
    if "num_trials" not in study.model_fields_set and study.time_budget_s is not None:
        study = study.model_copy(update={"num_trials": BUDGETED_TRIALS})
        console.print(f"num_trials (default, with time_budget_s): trials start until the {study.time_budget_s:g} s "
                      "budget ends", soft_wrap=True)
    if "scheduler" in study.model_fields_set:
        return study
    batch = typical_batch(study, space)
    epochs = adaptive_max_epochs(train_rows, batch)
    console.print(f"scheduler (default, from the data): max_epochs {epochs} for {train_rows:,} training rows "
                  f"at batch {batch} (about {TARGET_STEPS:,} steps for the longest trials), ASHA from epoch 1",
                  soft_wrap=True)
    return study.model_copy(update={"scheduler": SchedulerSettings(max_epochs=epochs)})
