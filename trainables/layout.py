"""The names of everything qlora-tune writes to disk or to MLflow, in one place.

A *model folder* (what ``train`` writes, what a trial's checkpoint and MLflow run hold, what the
pyfunc model carries) has :data:`ADAPTER`, :data:`TOKENIZER`, :data:`LABELS` and :data:`CONFIG`, which
are all a predictor needs, plus reports. A trial *checkpoint* has :data:`CHECKPOINT_STATE` (what
resuming needs) and :data:`CHECKPOINT_MODEL` (a model folder of the best epoch so far).
"""

from __future__ import annotations

# ---------------------------------------------------------------- a model folder
ADAPTER = "adapter"                # the LoRA adapter (adapter_config.json, adapter_model.safetensors)
TOKENIZER = "tokenizer"
LABELS = "labels.json"             # {"names": [...]}: the label set, in score order
CONFIG = "config.yaml"             # the run config the adapter was trained with
RUN_INFO = "run_info.json"         # approach, base model, best epoch, data fingerprint
METRICS = "metrics.json"           # per-epoch history and final reports per split
PLOTS = "plots"                    # confusion_<split>.json/.png
REQUIRED = (ADAPTER, TOKENIZER, LABELS, CONFIG)
"""What a predictor reads."""

# ---------------------------------------------------------------- a trial checkpoint
CHECKPOINT_STATE = "state"         # adapter, optimizer, scheduler, history
CHECKPOINT_MODEL = "model"         # a model folder of the best epoch so far

# ---------------------------------------------------------------- MLflow artifact paths
RUN_MODEL_ARTIFACT = "model"       # a trial run's model folder
PYFUNC_MODEL_DIR = "model_dir"     # the pyfunc model's artifact holding the model folder
BEST_CONFIG = "best_config.yaml"   # the study run's copy of its best trial's CONFIG
