"""The Ray Tune trial: one training run that reports every epoch with a checkpoint and logs to
its own MLflow child run.

The checkpoint holds ``state/`` (adapter, optimizer, scheduler, history: what resuming needs) and
``model/`` (the output-folder layout of the best epoch so far: what promotion needs). The search
never sees the test split.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL_DIR = "model"
STATE_DIR = "state"


@dataclasses.dataclass
class TrialContext:
    """What every trial of a study needs besides its sampled parameters (JSON-serializable)."""

    study: str
    run_config: dict
    """The fixed settings of every trial (epochs = the scheduler's max_epochs)."""
    cpus_per_trial: float
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    metric: str
    max_epochs: int
    gpu_per_trial: float


def trial_config(ctx: TrialContext, params: dict[str, Any]):
    """The trial's RunConfig: the study's fixed settings with the sampled ``params`` applied."""
    import copy

    from trainables.config import RunConfig, decode_choice, set_dotted

    tree = copy.deepcopy(ctx.run_config)
    for k, v in flat_params(params).items():
        set_dotted(tree, k, decode_choice(v))
    return RunConfig.model_validate(tree)


def flat_params(params: dict[str, Any]) -> dict[str, Any]:
    """Sampled parameters as ``{config.key: value}``: drops the ``<approach>:`` prefix of
    per-approach parameters and undoes any nesting Ray applied to the config dict."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, dict):
            for k2, v2 in flat_params(v).items():
                out[k2] = v2
        else:
            out[k.split(":", 1)[-1]] = v
    return out


def train_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    """Ray Tune function trainable."""
    import ray.tune as tune
    import torch

    from trainables.config import decode_choice
    from trainables.data import load_dataset
    from trainables.loop import Trainer, write_artifacts
    from trainables.runlog import TrialRun

    cfg = trial_config(ctx, params)
    params = {k: decode_choice(v) for k, v in flat_params(params).items()}
    if ctx.cpus_per_trial >= 1:
        torch.set_num_threads(int(ctx.cpus_per_trial))
    trial_id = tune.get_context().get_trial_id()
    run = TrialRun(ctx, trial_id, tune.get_context().get_trial_name(), cfg, params)
    data = load_dataset(cfg.data)
    data.test = None  # the search never sees the test split
    started = time.time()
    trainer = Trainer(cfg, data, log=lambda *_: None)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            trainer.load_checkpoint(Path(d) / STATE_DIR)
    run.sync_history(trainer.history)
    run.log_metrics({"setup_seconds": trainer.setup_seconds}, step=trainer.epoch)

    def on_epoch(report, tr) -> None:
        m = dict(report.metrics)
        m["gpu_seconds"] = ctx.gpu_per_trial * sum(h["train_seconds"] + h.get("eval_seconds", 0) for h in tr.history)
        run.log_metrics(m, step=report.epoch)  # before tune.report: Ray may stop the trial there
        with tempfile.TemporaryDirectory(prefix="qlt-ckpt-") as d:
            tr.save_checkpoint(Path(d) / STATE_DIR)
            if report.epoch == ctx.max_epochs:
                # last epoch: full reports of the selected adapter, logged by the trial itself
                write_artifacts(Path(d) / MODEL_DIR, tr, tr.finish())
                run.complete(Path(d) / MODEL_DIR, time.time() - started)
            else:
                tr.write_best_model(Path(d) / MODEL_DIR)
            tune.report(m, checkpoint=tune.Checkpoint.from_directory(d))

    try:
        trainer.fit(on_epoch)
    finally:
        del trainer
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
