"""Console output shared by the commands, and quieting third-party chatter."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from rich.console import Console

_width = None if sys.stdout.isatty() else 150  # rich assumes 80 columns when piped
console = Console(stderr=False, highlight=False, width=_width)
err_console = Console(stderr=True, highlight=False, width=_width)


def quiet_libraries() -> None:
    """Keep transformers/peft/bitsandbytes/datasets warnings and progress bars out of the output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    warnings.filterwarnings("ignore")
    for name in ("transformers", "peft", "bitsandbytes", "datasets", "accelerate", "mlflow",
                 # "Failed to fetch metrics" for a trial the time budget ended before it reported:
                 # the study's summary already says so, from MLflow
                 "ray.tune.analysis.experiment_analysis"):
        logging.getLogger(name).setLevel(logging.ERROR)
    transformers = sys.modules.get("transformers")  # imported already: the variables above came too late
    if transformers is not None:  # (importing it here would cost the CLI a second)
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
