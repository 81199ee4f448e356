"""Defaults that adapt to the study's data and model: what a study file leaves out is decided here,
once, before Ray starts, and recorded with the study (its config in MLflow shows the resolved values).

* ``search`` left out: the default space (:data:`tuner.study_config.DEFAULT_SEARCH`) with batch sizes
  for the model's size (:func:`default_batches`: a small model's step costs about the same at batch 128
  as at 16, so small batches waste the GPU; a large model's batches must fit) and the learning-rate
  range scaled with them (square-root rule, :func:`scaled_learning_rate`). The study's own batch size
  and learning rate, where the file leaves them out, become the median batch and its scaled rate: they
  are the first trials' settings.
* ``scheduler`` left out: the longest trials see about :data:`TARGET_EXAMPLES` training examples, so
  ``max_epochs`` follows the training rows, between 2 and 8 epochs; ASHA's rungs (1, 2, 4, ... epochs)
  follow from it. Few rows get more epochs, many rows fewer. Beyond ``TARGET_EXAMPLES / 2`` rows an
  epoch would outgrow the target: epochs then hold :data:`LARGE_EPOCH` examples
  (``training.epoch_examples``, unless the file sets it), 4 of them, so the first rung and its
  evaluation come after a quarter of the target, however large the data.
* ``num_trials`` left out: 8, or, with ``time_budget_s``, as many as the budget allows (the budget
  ends the study, not a trial count picked without knowing how fast trials run).
* The first trial of each approach runs the study's own settings (:func:`tuner.searcher.first_points`).
"""

from __future__ import annotations

import copy
import math
import statistics

from tuner.console import console
from tuner.study_config import DEFAULT_SEARCH, SchedulerSettings, StudyConfig

TARGET_EXAMPLES = 32_000
"""Training examples a trial that runs to ``max_epochs`` sees (LoRA classification fine-tunes settle
within about a thousand steps at batch 32; with the learning rate following the batch, examples, not
steps, measure the work)."""
EPOCH_BOUNDS = (2, 8)
LARGE_EPOCH = TARGET_EXAMPLES // 4
"""Examples per epoch (``training.epoch_examples``) where the training rows exceed
``TARGET_EXAMPLES / EPOCH_BOUNDS[0]``."""
BUDGETED_TRIALS = 10_000
"""``num_trials`` of a study with a time budget and no trial count: more than any budget runs."""
REFERENCE_BATCH = 32
"""The batch size the default learning-rate range is given for."""
QLORA_RECIPE = (16, 2e-4)
"""The QLoRA paper's batch size and learning rate: the anchor of the first trials' learning rate."""
BATCHES_BY_SIZE = ((0.5e9, [32, 64, 128]), (3e9, [16, 32, 64]), (math.inf, [8, 16, 32]))
"""Default batch sizes by the model's parameter count (at most)."""


def default_batches(parameters: int) -> list[int]:
    return next(b for limit, b in BATCHES_BY_SIZE if parameters <= limit)


def scaled_learning_rate(lr: float, batch: int, reference: int) -> float:
    """``lr`` given for ``reference`` examples per step, moved to ``batch`` by the square-root rule."""
    return lr * math.sqrt(batch / reference)


def with_default_search(study: StudyConfig) -> StudyConfig:
    """A study without ``search``: the default space for its model, written into the study."""
    if study.search is not None:
        return study
    from trainables.models import parameter_count, resolve_model

    path = resolve_model(study.model)  # a model that cannot be had fails here, with its one line
    try:
        n = parameter_count(path, study.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - a config transformers cannot build on the meta device
        n = int(BATCHES_BY_SIZE[1][0])
        console.print(f"search (default): could not count the parameters of {study.model} ({type(e).__name__}); "
                      f"using the batch sizes of a {n / 1e9:.0f}B model", soft_wrap=True)
    batches = default_batches(n)
    training = study.training
    median = int(statistics.median_low(batches))
    step = median * training.grad_accum  # examples per optimizer step

    def rate(lr: float, batch: int) -> float:
        return float(f"{scaled_learning_rate(lr, step, batch):.3g}")

    search = copy.deepcopy(DEFAULT_SEARCH)
    search["training.batch_size"] = {"choice": batches}
    search["training.learning_rate"] = {"loguniform": [rate(v, REFERENCE_BATCH) for v in
                                                       DEFAULT_SEARCH["training.learning_rate"]["loguniform"]]}
    first = {}
    if "batch_size" not in training.model_fields_set:
        first["batch_size"] = median
    if "learning_rate" not in training.model_fields_set:
        first["learning_rate"] = rate(QLORA_RECIPE[1], QLORA_RECIPE[0])
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"
    console.print(f"search (default, for a model of {size} parameters): batch sizes {batches}, learning "
                  f"rate {search['training.learning_rate']['loguniform']}"
                  + (f"; first trials at {', '.join(f'{k} {v:g}' for k, v in first.items())}" if first else ""),
                  soft_wrap=True)
    return study.model_copy(update={"search": search, "training": training.model_copy(update=first)})


def adaptive_max_epochs(train_rows: int) -> int:
    lo, hi = EPOCH_BOUNDS
    return max(lo, min(hi, math.ceil(TARGET_EXAMPLES / max(1, train_rows))))


def adapt(study: StudyConfig, train_rows: int) -> StudyConfig:
    """``study`` with the defaults it left out decided for its model and data (see the module
    docstring); parse its ``search`` again afterwards."""
    study = with_default_search(study)
    if "num_trials" not in study.model_fields_set and study.time_budget_s is not None:
        study = study.model_copy(update={"num_trials": BUDGETED_TRIALS})
        console.print(f"num_trials (default, with time_budget_s): trials start until the {study.time_budget_s:g} s "
                      "budget ends", soft_wrap=True)
    if "scheduler" in study.model_fields_set:
        return study
    epochs = adaptive_max_epochs(train_rows)
    training = study.training
    large = train_rows * EPOCH_BOUNDS[0] > TARGET_EXAMPLES and "epoch_examples" not in training.model_fields_set
    if large:
        epochs = TARGET_EXAMPLES // LARGE_EPOCH
        training = training.model_copy(update={"epoch_examples": LARGE_EPOCH})
    console.print(f"scheduler (default, from the data): max_epochs {epochs} for {train_rows:,} training rows"
                  + (f", epochs of {LARGE_EPOCH:,} examples (training.epoch_examples)" if large else "")
                  + f" (about {TARGET_EXAMPLES:,} examples for the longest trials), ASHA from epoch 1", soft_wrap=True)
    return study.model_copy(update={"scheduler": SchedulerSettings(max_epochs=epochs), "training": training})
