"""MLflow runs of a study, as the trial and the driver both see them (logging over HTTP).

One parent run per study; one child run per trial (tag ``mlflow.parentRunId``), found again by the
tags ``qlora_tune.study`` + ``qlora_tune.trial_id`` so a resumed trial continues its own run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from trainables.config import RunConfig

STUDY_TAG = "qlora_tune.study"
TRIAL_TAG = "qlora_tune.trial_id"
STATE_TAG = "qlora_tune.state"  # running | completed | stopped_early | errored | interrupted
REASON_TAG = "qlora_tune.reason"
KIND_TAG = "qlora_tune.kind"  # study | trial


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def find_runs(c, exp_id: str, study: str, kind: str, trial_id: str | None = None,
              parent_run_id: str | None = None) -> list:
    """Runs of a study (``kind`` study or trial), optionally of one trial / under one parent run."""
    f = f"tags.`{STUDY_TAG}` = '{study}' and tags.`{KIND_TAG}` = '{kind}'"
    if parent_run_id:
        f += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    if trial_id:
        f += f" and tags.`{TRIAL_TAG}` = '{trial_id}'"
    runs, token = [], None
    while True:
        page = c.search_runs([exp_id], filter_string=f, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def flat_params(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, key + "."))
        else:
            s = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
            out[key] = s[:6000]
    return out


def log_params(c, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in flat_params(params).items()]
    for s in range(0, len(items), 100):
        try:
            c.log_batch(run_id, params=items[s: s + 100])
        except Exception:  # noqa: BLE001 - params already logged (resumed run) are immutable
            pass


def log_metrics(c, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if isinstance(v, (int, float))]
    for s in range(0, len(items), 500):
        c.log_batch(run_id, metrics=items[s: s + 500])



class TrialRun:
    """Get-or-create the child run of ``trial_id`` (a resumed trial continues its own run)."""

    def __init__(self, ctx, trial_id: str, trial_name: str, cfg: RunConfig, params: dict):
        self.c = client(ctx.tracking_uri)
        found = find_runs(self.c, ctx.experiment_id, ctx.study, "trial", trial_id, ctx.parent_run_id)
        if found:
            self.run_id = found[0].info.run_id
            self.c.update_run(self.run_id, status="RUNNING")
            self.c.set_tag(self.run_id, STATE_TAG, "running")
        else:
            run = self.c.create_run(ctx.experiment_id, run_name=f"{trial_name} ({cfg.approach})", tags={
                "mlflow.parentRunId": ctx.parent_run_id, STUDY_TAG: ctx.study, TRIAL_TAG: trial_id,
                KIND_TAG: "trial", STATE_TAG: "running", "approach": cfg.approach,
            })
            self.run_id = run.info.run_id
            log_params(self.c, self.run_id, cfg.dump())
            log_params(self.c, self.run_id, {f"search.{k}": v for k, v in params.items()})

    def log_metrics(self, metrics: dict, step: int) -> None:
        log_metrics(self.c, self.run_id, metrics, step)

    def sync_history(self, history: list[dict]) -> None:
        """Log epochs from a checkpoint's history that the run is missing (crash between the
        checkpoint and the log call): metrics stay continuous, never duplicated."""
        if not history:
            return
        logged = {m.step for m in self.c.get_metric_history(self.run_id, "train_loss")}
        for h in history:
            if h["epoch"] not in logged:
                self.log_metrics(h, step=h["epoch"])

    def complete(self, folder: Path, seconds: float) -> None:
        self.c.log_artifacts(self.run_id, str(folder), "model")
        self.c.set_tag(self.run_id, STATE_TAG, "completed")
        self.c.set_terminated(self.run_id, "FINISHED")
