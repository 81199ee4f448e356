"""MLflow runs of a study, as the trial and the driver both see them (logging over HTTP).

One parent run per study; one child run per trial (tag ``mlflow.parentRunId``), found again by the
tags ``qlora_tune.study`` + ``qlora_tune.trial_id`` so a resumed trial continues its own run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from trainables.config import RunConfig

STUDY_TAG = "qlora_tune.study"
TRIAL_TAG = "qlora_tune.trial_id"
STATE_TAG = "qlora_tune.state"  # running | completed | stopped_early | errored | interrupted | lost
REASON_TAG = "qlora_tune.reason"
KIND_TAG = "qlora_tune.kind"  # study | trial
NODE_TAG = "qlora_tune.node_id"  # the Ray node the trial (last) ran on
PID_TAG = "qlora_tune.pid"  # the worker process the trial (last) ran in


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray
        return "local"


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



def log_datasets(c, run_id: str, data) -> None:
    """Name the run's data in MLflow: one dataset input per split (name, digest, source, rows and
    class counts), shown in the UI's Dataset column and on the run page."""
    from collections import Counter

    from mlflow.entities import Dataset as MlflowDataset
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for split, s in data.splits().items():
        counts = Counter(data.label_names[y] for y in s.labels)
        source = data.sources.get(split, "")
        ds = MlflowDataset(
            name=split, digest=data.split_digest(split), source_type="local",
            source=json.dumps({"uri": source}),
            schema=json.dumps({"columns": ["text", "label"], "labels": data.label_names}),
            profile=json.dumps({"num_rows": len(s), "class_counts": dict(sorted(counts.items()))}),
        )
        inputs.append(DatasetInput(ds, tags=[InputTag("mlflow.data.context", split)]))
    c.log_inputs(run_id, datasets=inputs)


class TrialRun:
    """Get-or-create the child run of ``trial_id`` (a resumed trial continues its own run).

    Training never waits on tracking: metrics that cannot be logged (server away) are kept and
    sent with the next call; the trial only ends once everything is logged (up to ``patience_s``)."""

    def __init__(self, ctx, trial_id: str, trial_name: str, cfg: RunConfig, params: dict,
                 patience_s: float = 300.0):
        self.c = client(ctx.tracking_uri)
        self.patience_s = patience_s
        self._pending: list[tuple[dict, int]] = []
        self._warned = False
        self._retry(lambda: self._open(ctx, trial_id, trial_name, cfg, params))

    def _open(self, ctx, trial_id, trial_name, cfg, params) -> None:
        found = find_runs(self.c, ctx.experiment_id, ctx.study, "trial", trial_id, ctx.parent_run_id)
        self.completed = bool(found) and found[0].data.tags.get(STATE_TAG) == "completed"
        if self.completed:  # restored from its final checkpoint: the run was completed before it
            self.run_id = found[0].info.run_id
            return
        if found:
            self.run_id = found[0].info.run_id
            self.c.update_run(self.run_id, status="RUNNING")
            self.c.set_tag(self.run_id, STATE_TAG, "running")
            self.c.set_tag(self.run_id, "resumed", "true")
        else:
            run = self.c.create_run(ctx.experiment_id, run_name=f"{trial_name} ({cfg.approach})", tags={
                "mlflow.parentRunId": ctx.parent_run_id, STUDY_TAG: ctx.study, TRIAL_TAG: trial_id,
                KIND_TAG: "trial", STATE_TAG: "running", "approach": cfg.approach,
            })
            self.run_id = run.info.run_id
            log_params(self.c, self.run_id, cfg.dump())
            log_params(self.c, self.run_id, {f"search.{k}": v for k, v in params.items()})
        self.c.set_tag(self.run_id, NODE_TAG, _node_id())
        self.c.set_tag(self.run_id, PID_TAG, str(os.getpid()))

    def _retry(self, fn):
        """Call ``fn`` until it succeeds or ``patience_s`` runs out (then raise: Ray retries the trial)."""
        deadline = time.time() + self.patience_s
        while True:
            try:
                return fn()
            except Exception:  # noqa: BLE001 - server away, timeouts, 5xx
                if time.time() > deadline:
                    raise
                time.sleep(5)

    def log_data(self, data) -> None:
        """The splits this trial trains and selects on, as MLflow dataset inputs (never raises)."""
        try:
            log_datasets(self.c, self.run_id, data)
        except Exception as e:  # noqa: BLE001 - naming the data must not fail a trial
            print(f"qlora-tune: could not log dataset inputs ({type(e).__name__})")

    def log_metrics(self, metrics: dict, step: int) -> None:
        self._pending.append((dict(metrics), step))
        self.flush()

    def flush(self) -> bool:
        """Send what is pending; False (and keep it) while the server does not answer."""
        while self._pending:
            metrics, step = self._pending[0]
            try:
                log_metrics(self.c, self.run_id, metrics, step)
            except Exception as e:  # noqa: BLE001
                if not self._warned:
                    print(f"qlora-tune: MLflow unreachable ({type(e).__name__}); keeping metrics to send later")
                    self._warned = True
                return False
            self._pending.pop(0)
        return True

    def sync_history(self, history: list[dict]) -> None:
        """Log epochs from a checkpoint's history that the run is missing (crash between the
        checkpoint and the log call): metrics stay continuous, never duplicated."""
        if not history:
            return
        logged = {m.step for m in self._retry(lambda: self.c.get_metric_history(self.run_id, "train_loss"))}
        for h in history:
            if h["epoch"] not in logged:
                self.log_metrics(h, step=h["epoch"])

    def complete(self, folder: Path, seconds: float) -> None:
        def finish():
            if not self.flush():
                raise ConnectionError("MLflow unreachable")
            self.c.log_artifacts(self.run_id, str(folder), "model")
            self.c.set_tag(self.run_id, STATE_TAG, "completed")
            self.c.set_terminated(self.run_id, "FINISHED")

        self._retry(finish)
        self.completed = True
