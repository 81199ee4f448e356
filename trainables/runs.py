"""The MLflow runs of a study, and every change of their state, in one module.

One parent run per study (``kind=study``), one child run per trial (``kind=trial``, tag
``mlflow.parentRunId``), one run per promotion (``kind=promotion``). Runs are found again by the tags
``qlora_tune.study`` + ``qlora_tune.trial_id``, so a resumed trial continues its own run. A run's state
is a :class:`RunState`: the ``qlora_tune.state`` tag, with the MLflow status that goes with it; only
:func:`set_state` (and the openers here) write either. Trials and the driver both log over HTTP.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import time
from pathlib import Path

from trainables import layout as L
from trainables import params as P
from trainables.config import RunConfig

STUDY_TAG = "qlora_tune.study"
TRIAL_TAG = "qlora_tune.trial_id"
STATE_TAG = "qlora_tune.state"
REASON_TAG = "qlora_tune.reason"
OOM_TAG = "qlora_tune.out_of_memory"
"""Set on a trial's run when it ran out of GPU memory: Ray's retries of the trial end at once."""
GRAPHS_FAILED_TAG = "qlora_tune.cuda_graphs_failed"
"""Set on a trial's run when its training steps were to replay from CUDA graphs but a capture failed
(the reason): the trial went on with eager steps, several times slower on a small model."""
KIND_TAG = "qlora_tune.kind"  # study | trial | promotion
NODE_TAG = "qlora_tune.node_id"  # the Ray node the trial (last) ran on
PID_TAG = "qlora_tune.pid"  # the worker process the trial (last) ran in
PROCESS_STARTED_TAG = "qlora_tune.process_started"  # when that process started (epoch seconds)
ENTERED_TAG = "qlora_tune.entered"  # when the trial's function began in it (epoch seconds)
IMPORT_WAIT_TAG = "qlora_tune.import_wait"
"""Seconds the trial waited for its worker's imports ahead (trainables.import_ahead); absent where the
worker made none."""


class RunState(str, enum.Enum):
    """The state of a study's or a trial's run (tag ``qlora_tune.state``)."""

    RUNNING = "running"
    COMPLETED = "completed"          # ran to its last epoch (a trial) or to the end (a study)
    STOPPED_EARLY = "stopped_early"  # cut by the scheduler; its best epoch still counts
    ERRORED = "errored"              # raised; the reason is tagged
    INTERRUPTED = "interrupted"      # the driver was interrupted or died; `resume` continues it
    LOST = "lost"                    # started by a driver that died before Ray recorded the trial

    @property
    def mlflow_status(self) -> str:
        return {"running": "RUNNING", "completed": "FINISHED", "stopped_early": "FINISHED",
                "errored": "FAILED"}.get(self.value, "KILLED")

    @property
    def has_model(self) -> bool:
        """Whether a run in this state holds a trained model folder."""
        return self in (RunState.COMPLETED, RunState.STOPPED_EARLY)


def _process_started() -> float:
    import psutil

    return psutil.Process().create_time()


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


def _mlflow_params(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow params: dotted keys, string values (lists as JSON)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_mlflow_params(v, key + "."))
        else:
            s = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
            out[key] = s[:6000]
    return out


def log_params(c, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in _mlflow_params(params).items()]
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


# ------------------------------------------------------------------ state changes


def set_state(c, run_id: str, state: RunState, reason: str | None = None) -> None:
    """Tag ``state`` (and ``reason``) and give the run the MLflow status that goes with it."""
    c.set_tag(run_id, STATE_TAG, state.value)
    if reason:
        c.set_tag(run_id, REASON_TAG, reason[:500])
    if state is RunState.RUNNING:
        c.update_run(run_id, status="RUNNING")
    else:
        c.set_terminated(run_id, state.mlflow_status)


def state_of(run) -> RunState | None:
    v = run.data.tags.get(STATE_TAG)
    return RunState(v) if v in RunState._value2member_map_ else None


def open_study_run(c, exp_id: str, study: str, tags: dict[str, str]) -> str:
    """A new parent run for ``study``; returns its id."""
    run = c.create_run(exp_id, run_name=study, tags={STUDY_TAG: study, KIND_TAG: "study",
                                                      STATE_TAG: RunState.RUNNING.value, **tags})
    return run.info.run_id


def open_trial_run_after_failure(c, exp_id: str, study: str, parent_run_id: str, trial_id: str,
                                 approach: str, params: dict) -> str:
    """The run of a trial that failed before it could open its own (so that it is recorded)."""
    run = c.create_run(exp_id, run_name=f"{trial_id} (failed at start)", tags={
        STUDY_TAG: study, KIND_TAG: "trial", TRIAL_TAG: trial_id, "approach": approach,
        "mlflow.parentRunId": parent_run_id, STATE_TAG: RunState.RUNNING.value})
    log_params(c, run.info.run_id, P.to_mlflow(params))
    return run.info.run_id


def drop_lost_run(c, run_id: str, reason: str) -> None:
    """End a run nobody will continue and soft-delete it (``mlflow runs restore`` brings it back)."""
    set_state(c, run_id, RunState.LOST, reason)
    c.delete_run(run_id)


@contextlib.contextmanager
def promotion_run(uri: str, exp_id: str, name: str, tags: dict[str, str]):
    """An active (fluent) MLflow run for promoting a trial, ended FINISHED, or FAILED on an error."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=exp_id, run_name=name, tags={KIND_TAG: "promotion", **tags}) as run:
        yield run


# ------------------------------------------------------------------ a trial's run


class TrialRun:
    """Get-or-create the child run of ``trial_id`` (a resumed trial continues its own run).

    Training never waits on tracking: metrics that cannot be logged (server away) are kept and
    sent with the next call; the trial only ends once everything is logged (up to ``patience_s``)."""

    def __init__(self, ctx, trial_id: str, trial_name: str, cfg: RunConfig, params: dict,
                 patience_s: float = 300.0, entered: float | None = None, import_wait: float | None = None):
        self.c = client(ctx.tracking_uri)
        self.patience_s = patience_s
        self._pending: list[tuple[dict, int]] = []
        self._warned = False
        self._retry(lambda: self._open(ctx, trial_id, trial_name, cfg, params, entered, import_wait))

    def _open(self, ctx, trial_id, trial_name, cfg, params, entered, import_wait) -> None:
        found = find_runs(self.c, ctx.experiment_id, ctx.study, "trial", trial_id, ctx.parent_run_id)
        self.completed = bool(found) and state_of(found[0]) is RunState.COMPLETED
        self.out_of_memory = found[0].data.tags.get(OOM_TAG) if found else None
        """The reason an earlier attempt of this trial ran out of GPU memory (None: it did not)."""
        if self.completed:  # restored from its final checkpoint: the run was completed before it
            self.run_id = found[0].info.run_id
            return
        if found:
            self.run_id = found[0].info.run_id
            set_state(self.c, self.run_id, RunState.RUNNING)
            self.c.set_tag(self.run_id, "resumed", "true")
        else:
            run = self.c.create_run(ctx.experiment_id, run_name=f"{trial_name} ({cfg.approach})", tags={
                "mlflow.parentRunId": ctx.parent_run_id, STUDY_TAG: ctx.study, TRIAL_TAG: trial_id,
                KIND_TAG: "trial", STATE_TAG: RunState.RUNNING.value, "approach": cfg.approach,
            })
            self.run_id = run.info.run_id
            log_params(self.c, self.run_id, cfg.dump())
            log_params(self.c, self.run_id, P.to_mlflow(params))
        from mlflow.entities import RunTag

        tags = {NODE_TAG: _node_id(), PID_TAG: str(os.getpid()), PROCESS_STARTED_TAG: f"{_process_started():.3f}"}
        if entered:
            tags[ENTERED_TAG] = f"{entered:.3f}"
        if import_wait is not None:
            tags[IMPORT_WAIT_TAG] = f"{import_wait:.3f}"
        self.c.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])  # one request, not one per tag

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

    def graphs_failed(self, reason: str) -> None:
        """Remember on the run why its CUDA graphs failed (see :data:`GRAPHS_FAILED_TAG`; never raises)."""
        try:
            self.c.set_tag(self.run_id, GRAPHS_FAILED_TAG, reason[:500])
        except Exception as e:  # noqa: BLE001 - a note must not fail a trial
            print(f"qlora-tune: could not tag the run ({type(e).__name__})")

    def ran_out_of_memory(self, reason: str) -> None:
        """Remember on the run that this trial ran out of GPU memory (see :data:`OOM_TAG`)."""
        self._retry(lambda: self.c.set_tag(self.run_id, OOM_TAG, reason[:500]))

    def complete(self, folder: Path, seconds: float) -> None:
        def finish():
            if not self.flush():
                raise ConnectionError("MLflow unreachable")
            self.c.log_artifacts(self.run_id, str(folder), L.RUN_MODEL_ARTIFACT)
            set_state(self.c, self.run_id, RunState.COMPLETED)

        self._retry(finish)
        self.completed = True
