"""Run and resume a study: Ray Tune + Optuna TPE + ASHA, every trial a child run in MLflow."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from trainables import compat
from trainables import layout as L
from trainables import runs as R
from trainables.errors import InputError
from trainables.paths import home
from trainables.trial import TrialContext, train_trial
from tuner import tracking
from tuner.console import console
from tuner.ray_cluster import check_resources, connect, local_gpus
from tuner.records import StudyRecord, check_name
from tuner.study_config import SearchSpace, StudyConfig, load_study, parse_search
from tuner.versions import installed

if TYPE_CHECKING:
    from trainables.data import Dataset

STUDY_PACKAGES = ("qlora-tune", "ray", "torch", "transformers", "peft", "bitsandbytes", "optuna", "mlflow")
"""The packages whose versions a study's run records."""

# ------------------------------------------------------------------ run / resume


class _Laps:
    """``lap(name)`` adds the seconds since the previous lap (or since it was made) to ``phases[name]``."""

    def __init__(self):
        self.phases: dict[str, float] = {}
        self._last = time.time()

    def __call__(self, name: str) -> None:
        now = time.time()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._last
        self._last = now


def _context(rec: StudyRecord, res: dict[str, float]) -> TrialContext:
    s = rec.study
    r = s.resources_per_trial
    return TrialContext(study=rec.name, run_config=s.run_config().dump(), cpus_per_trial=res["cpu"],
                        tracking_uri=rec.tracking_uri, experiment_id=rec.experiment_id,
                        parent_run_id=rec.parent_run_id, max_epochs=s.scheduler.max_epochs,
                        gpu_per_trial=res["gpu"], workers=r.workers,
                        gpus_per_worker=res["gpu"] / r.workers, storage_path=rec.storage_path,
                        reuse=_reuse_actors(s))


def _trainable(rec: StudyRecord, res: dict[str, float]):
    from ray import tune

    fn = tune.with_parameters(train_trial, ctx=_context(rec, res))
    if rec.study.resources_per_trial.workers > 1:
        # a data-parallel trial only coordinates; its Ray Train workers reserve the CPUs and GPUs
        # (Tune refuses an empty request: a token 1 MiB of Ray's memory resource stands in)
        return tune.with_resources(fn, {"cpu": 0, "memory": 2**20})
    return tune.with_resources(fn, res)


def _concurrency(study: StudyConfig, res: dict[str, float], cluster: dict[str, float]) -> int | None:
    """Data-parallel trials reserve their workers themselves, so Tune would start every trial at once:
    by default run as many as the cluster holds."""
    if study.max_concurrent_trials or study.resources_per_trial.workers == 1:
        return study.max_concurrent_trials
    return _fitting(study, res, cluster)


def _fitting(study: StudyConfig, res: dict[str, float], cluster: dict[str, float]) -> int:
    """How many trials of ``res`` (per worker's CPUs; GPUs per trial) the cluster's CPUs and GPUs hold at once."""
    fits = [cluster.get("CPU", 0.0) / (res["cpu"] * study.resources_per_trial.workers)]
    if res["gpu"] > 0:
        fits.append(cluster.get("GPU", 0.0) / res["gpu"])
    return max(1, int(min(fits) + 1e-9))


AFTER_RAY = ("mlflow.tracking", "optuna", "ray.tune.search.optuna", "ray.tune.execution.tune_controller",
             "tuner.searcher", "tuner.callbacks", "tuner.packing", "tuner.summary",
             "optuna.importance", "optuna.visualization.matplotlib", "matplotlib.pyplot")
"""What a study imports once Ray has started, for its trials and for its report at the end (about 4 s
on a CPU): imported while Ray starts, when the driver mostly waits for Ray's processes."""


def _connect_for_trials(address: str | None) -> None:
    """Join or start the cluster a study's trials run on (its own local cluster without Ray's
    dashboard), importing :data:`AFTER_RAY` meanwhile; its workers import what trials need before
    the trials come (:mod:`trainables.import_ahead`)."""
    from trainables import import_ahead

    import_ahead.import_in_background(AFTER_RAY)
    connect(address, dashboard=False, setup_hook=import_ahead.HOOK)


def _pending_trials(study: StudyConfig, res: dict[str, float], cluster: dict[str, float]) -> int:
    """How many trials Tune may start at once. With a searcher and no concurrency limit Tune keeps one
    trial pending: each trial's process then starts only once the one before has begun (on an H200,
    eleven trials' processes started 4-5 s apart). As many as run at once start together instead."""
    return min(study.max_concurrent_trials or study.num_trials, _fitting(study, res, cluster), study.num_trials)


def _load(path: Path, overrides: list[str], address: str | None) -> tuple[StudyConfig, SearchSpace, Dataset]:
    """The study file read and checked, its data loaded (bad data fails here, before Ray starts), and
    what depends on the data (the default space, batch sizes for the data's size) decided."""
    from trainables.data import load_dataset
    from tuner.defaults import adapt

    study, space = load_study(path, overrides)
    if address is None:  # a local cluster: what it will have is known before Ray starts
        import psutil

        check_resources(study, str(path), {"GPU": local_gpus(), "CPU": psutil.cpu_count()})
    data = load_dataset(study.data)
    study = adapt(study, len(data.train.texts))
    return study, parse_search(study, str(path)), data


def _place(study: StudyConfig, space: SearchSpace, path: Path, data: Dataset,
           refit: bool) -> tuple[StudyConfig, dict[str, float]]:
    """On the connected cluster: the study with ``gpu: auto`` resolved, and the resources per trial."""
    import ray

    from tuner.packing import resolve_auto_gpu

    study = resolve_auto_gpu(study, space, str(path), data.label_names, ray.cluster_resources(), refit)
    return study, check_resources(study, str(path), ray.cluster_resources())


def _count(study: StudyConfig) -> str:
    from tuner.defaults import BUDGETED_TRIALS

    return f"trials for {study.time_budget_s:g} s" if study.time_budget_s and study.num_trials >= BUDGETED_TRIALS \
        else f"{study.num_trials} trials"


def _per_trial(study: StudyConfig, space: SearchSpace, res: dict[str, float]) -> str:
    workers = f" x {study.resources_per_trial.workers} workers" if study.resources_per_trial.workers > 1 else ""
    return f"{_count(study)}, approaches {space.approaches(study.approach)}, {res} per trial{workers}"


def plan_study(path: Path, overrides: list[str], address: str | None, refit: bool = False) -> StudyConfig:
    """What ``run`` would do, without running a trial: the study checked, ``gpu: auto`` resolved (its fit
    kept in the fit cache for the run), and the plan printed."""
    import ray

    study, space, data = _load(path, overrides, address)
    connect(address, dashboard=False)
    study, res = _place(study, space, path, data, refit)
    cluster = ray.cluster_resources()
    at_once = _pending_trials(study, res, cluster)
    console.print(f"[bold]plan[/] {path}: {_per_trial(study, space, res)}; up to {at_once} at once on this "
                  f"cluster ({cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs); "
                  f"{len(data.train.texts)} training rows, labels {data.label_names}", soft_wrap=True)
    for block, params in space.describe().items():
        for key, d in params.items():
            kind, values = next((k, v) for k, v in d.items() if k != "log")
            console.print(f"  {'' if block == 'common' else block + ': '}{key}: {kind} {list(values)}", soft_wrap=True)
    return study


def run_study(path: Path, overrides: list[str], name: str | None, address: str | None,
              warm_start: str | None = None, refit: bool = False) -> StudyRecord:
    """Start a study; ``warm_start`` names an earlier one whose trials Optuna starts from; ``refit``
    measures ``gpu: auto``'s footprint again, even where the fit cache has it."""
    from ray import tune

    lap = _Laps()
    study, space, data = _load(path, overrides, address)
    name = name or f"{Path(path).stem}-{datetime.now():%Y%m%d-%H%M%S}"
    check_name(name)
    if (StudyRecord.folder(name) / "study.json").exists():
        raise InputError(f"study '{name}' already exists; continue it with `qlora-tune resume {name}` or pick another --name")
    old = StudyRecord.load(warm_start) if warm_start else None
    uri = tracking.resolve_tracking_uri(study.tracking.tracking_uri)
    tracking.require_server(uri)
    warm: list = []
    first: list[dict] = []
    if old is not None:
        from tuner.warm_start import warm_trials

        warm, notes, first = warm_trials(old, study, space)
        console.print(f"[bold]warm start[/] from {old.name}: {len(warm)} trial(s) carried over; the first "
                      f"trials rerun its best of each approach ({len(first)})"
                      + ("".join(f"\n  {n}" for n in notes) if notes else ""), soft_wrap=True)
    lap("load")
    _connect_for_trials(address)
    import ray

    lap("ray")
    study, res = _place(study, space, path, data, refit)  # recorded resolved
    lap("gpu_auto")
    c = R.client(uri)
    exp_id = tracking.experiment_id(c, study.tracking.experiment, study.tracking.artifact_location)
    tags = {"data_fingerprint": data.fingerprint(), "versions": json.dumps(installed(STUDY_PACKAGES))}
    if old is not None:
        tags.update({"warm_start": old.name, "warm_start_trials": str(len(warm))})
    parent_run_id = R.open_study_run(c, exp_id, name, tags)
    rec = StudyRecord(name=name, source=str(Path(path).resolve()), config=study.model_dump(mode="json"),
                      tracking_uri=uri, experiment_id=exp_id, parent_run_id=parent_run_id,
                      storage_path=study.storage or str(home() / "ray_results"),
                      created=datetime.now().isoformat(timespec="seconds"), data_fingerprint=data.fingerprint(),
                      start_phases=lap.phases)
    rec.save()
    try:
        R.log_params(c, rec.parent_run_id, {"study": {k: v for k, v in rec.config.items() if k != "search"},
                                            "search_space": space.describe()})
        R.log_datasets(c, rec.parent_run_id, data)
        c.log_text(rec.parent_run_id, json.dumps(rec.config, indent=2), "study_config.json")
        c.log_text(rec.parent_run_id, json.dumps(space.describe(), indent=2), "search_space.json")
        tuner = tune.Tuner(_trainable(rec, res),
                           tune_config=_tune_config(study, space, _concurrency(study, res, ray.cluster_resources()),
                                                    warm, first),
                           run_config=_run_config(rec, study))
    except BaseException as e:  # the parent run must not stay RUNNING
        finish_study(rec, interrupted=True, seconds=0.0, reason=f"{type(e).__name__}: {e}")
        raise
    lap("tracking")
    rec.start_phases = dict(lap.phases)  # saved when the trials start (_fit)
    console.print(f"[bold]study[/] {name}: {_per_trial(study, space, res)}; MLflow experiment "
                  f"'{study.tracking.experiment}'")
    console.print(f"[bold]MLflow UI[/]: {tracking.runs_link(uri, exp_id, name) or uri}", soft_wrap=True)
    return _fit(tuner, rec, _pending_trials(study, res, ray.cluster_resources()))


def resume_study(name: str, address: str | None) -> StudyRecord:
    from ray import tune

    rec = StudyRecord.load(name)
    if rec.state == "completed":
        console.print(f"study {name} is already complete")
        return rec
    tracking.require_server(rec.tracking_uri) if rec.tracking_uri.startswith("http") else None
    _connect_for_trials(address)
    import ray

    res = check_resources(rec.study, name, ray.cluster_resources())
    if not tune.Tuner.can_restore(rec.experiment_path):
        raise InputError(f"study '{name}': nothing to resume at {rec.experiment_path} (the driver died before Ray saved any state)")
    c = R.client(rec.tracking_uri)
    R.set_state(c, rec.parent_run_id, R.RunState.RUNNING)
    rec.state = "running"
    rec.save()
    console.print(f"[bold]resuming[/] {name} from {rec.experiment_path}")
    tuner = tune.Tuner.restore(rec.experiment_path, trainable=_trainable(rec, res), resume_errored=True)
    return _fit(tuner, rec, _pending_trials(rec.study, res, ray.cluster_resources()))


def _tune_config(study: StudyConfig, space, max_concurrent: int | None, warm_trials: list = (),
                 first: list[dict] = ()):
    """Ray Tune's settings for the study; ``first``: the first trials' parameters (none given: the
    study's own settings, :func:`tuner.searcher.first_points`)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from tuner.searcher import first_points, make_searcher

    sch = study.scheduler
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=sch.max_epochs, grace_period=sch.grace_period,
                               reduction_factor=sch.reduction_factor)
                 if sch.type == "asha" else FIFOScheduler())
    return tune.TuneConfig(
        metric=study.metric, mode=study.mode, num_samples=study.num_trials, scheduler=scheduler,
        search_alg=make_searcher(space, study.approach, study.seed, study.num_trials, sch.max_epochs,
                                 study.metric, study.mode, warm_trials,
                                 list(first) or first_points(space, study.approach, lambda a: _run_tree(study, a)),
                                 study.time_budget_s),
        max_concurrent_trials=max_concurrent,
        reuse_actors=_reuse_actors(study), time_budget_s=study.time_budget_s,
    )


def _run_tree(study: StudyConfig, approach: str) -> dict:
    return study.run_config({"approach": approach}).model_dump(mode="json")


def _reuse_actors(study: StudyConfig) -> bool:
    """Single-worker trials may reuse their Ray actor (a data-parallel trial's actor only coordinates)."""
    return study.reuse_actors and study.resources_per_trial.workers == 1


def _run_config(rec: StudyRecord, study: StudyConfig):
    from ray import tune

    # Tune forces a snapshot of the study whenever a trial has written keep_checkpoints checkpoints
    # since the last one (so a resumed study never lists a deleted checkpoint), and warns when that
    # happens more than once in 5 s, which short epochs always do. The snapshots are wanted and
    # cheap on local storage: keep the warning out of normal output.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from tuner.callbacks import StudyCallback

    return tune.RunConfig(
        name=rec.name, storage_path=rec.storage_path, verbose=0,
        # the newest: each holds the resume state and the best model so far (scored ones would add
        # Ray's always-kept latest on top of the best: two or three copies of a trial's state)
        checkpoint_config=tune.CheckpointConfig(num_to_keep=study.keep_checkpoints),
        failure_config=tune.FailureConfig(max_failures=study.max_failures),
        # Tune's own result files, without its TensorBoard logger (MLflow has the metrics; importing
        # it imports torch, seconds of the driver's before the first trials): see _fit
        callbacks=[StudyCallback(rec.name, rec.tracking_uri, rec.experiment_id, rec.parent_run_id, study.scheduler.max_epochs,
                                 study.metric, study.mode), CSVLoggerCallback(), JsonLoggerCallback()],
    )


@contextlib.contextmanager
def _env_default(name: str, value: str):
    """``os.environ[name] = value`` for the block, unless it is set already."""
    own = name not in os.environ
    if own:
        os.environ[name] = value
    try:
        yield
    finally:
        if own:
            os.environ.pop(name, None)


def _fit(tuner, rec: StudyRecord, pending: int) -> StudyRecord:
    """Run the trials (``pending``: how many Tune may start at once, :func:`_pending_trials`; a
    ``TUNE_MAX_PENDING_TRIALS_PG`` of the user's stands), then end the study."""
    import signal

    t0 = time.time()
    if not rec.trials_started:
        rec.trials_started = t0
        rec.save()
    interrupted = False
    before = signal.getsignal(signal.SIGINT)
    try:
        # Tune reads both as the fit starts; the loggers it would add are in _run_config's callbacks
        with _env_default("TUNE_MAX_PENDING_TRIALS_PG", str(pending)), _env_default("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1"):
            results = tuner.fit()
        rec.trials_returned = time.time()  # saved with the report
        # Ray Tune catches Ctrl-C itself and returns normally; its handler puts the previous one back
        # only when it fired, so a handler that is no longer Ray's means the study was interrupted
        ctrl_c = compat.tune_was_interrupted(signal.getsignal(signal.SIGINT))
        signal.signal(signal.SIGINT, before)
        unfinished = len(results) - results.num_terminated - results.num_errors
        # Ray returns normally after Ctrl-C; a trial run that neither the trial nor the callback
        # closed is the sign (every trial that ends, ends its run)
        c = R.client(rec.tracking_uri)
        open_runs = any(r.info.status == "RUNNING" for r in
                        R.find_runs(c, rec.experiment_id, rec.name, "trial", parent_run_id=rec.parent_run_id))
        budget = rec.study.time_budget_s
        interrupted = ctrl_c or ((unfinished > 0 or open_runs) and not (budget and time.time() - t0 >= budget))
    except KeyboardInterrupt:
        interrupted = True
    except BaseException as e:
        finish_study(rec, interrupted=True, seconds=time.time() - t0, reason=f"{type(e).__name__}: {e}")
        raise
    finish_study(rec, interrupted=interrupted, seconds=time.time() - t0)
    if interrupted:
        console.print(f"[yellow]study {rec.name} interrupted[/]; continue it with `qlora-tune resume {rec.name}`")
        raise KeyboardInterrupt
    return rec


def finish_study(rec: StudyRecord, interrupted: bool, seconds: float, reason: str | None = None) -> None:
    """End the study: trial runs still open become interrupted, the parent run gets the report
    (files and headline metrics, its best trial tagged) and its final state, and so does the record."""
    from tuner.summary import best_row, compute_summary, print_status, study_rows, write_study_report

    c = R.client(rec.tracking_uri)
    for run in R.find_runs(c, rec.experiment_id, rec.name, "trial", parent_run_id=rec.parent_run_id):
        if run.info.status == "RUNNING":
            if interrupted:
                R.set_state(c, run.info.run_id, R.RunState.INTERRUPTED)
            else:  # the study ended on its time budget with this trial mid-way
                _close_cut_by_budget(c, rec, run)
    df = study_rows(rec)
    summary = compute_summary(rec, df)
    with tempfile.TemporaryDirectory() as d:
        metrics = write_study_report(rec, df, summary, seconds, Path(d))
        c.log_artifacts(rec.parent_run_id, d)
    R.log_metrics(c, rec.parent_run_id, metrics, step=0)
    best = best_row(rec, df)
    if best is not None:
        c.set_tag(rec.parent_run_id, "best_trial_id", str(best["trial_id"]))
        c.set_tag(rec.parent_run_id, "best_run_id", str(best["run_id"]))
    state = R.RunState.INTERRUPTED if interrupted else R.RunState.COMPLETED
    R.set_state(c, rec.parent_run_id, state, reason)
    rec.state = state.value
    rec.save()
    if not interrupted:
        print_status(rec, df, summary)


def _close_cut_by_budget(c, rec: StudyRecord, run) -> None:
    """A trial the time budget cut keeps its best epoch: the model folder of its newest checkpoint
    goes to its run, which ends stopped early (promotion may pick it); without a checkpoint it ends
    interrupted."""
    from tuner import storage

    epochs = max((m.step for m in c.get_metric_history(run.info.run_id, rec.study.metric)), default=0)
    with tempfile.TemporaryDirectory() as d:
        model = storage.latest_model(rec.experiment_path, run.data.tags[R.TRIAL_TAG], Path(d) / "model") \
            if epochs else None
        if model is None:
            R.set_state(c, run.info.run_id, R.RunState.INTERRUPTED, "stopped by the time budget before its first epoch")
            return
        c.log_artifacts(run.info.run_id, str(model), L.RUN_MODEL_ARTIFACT)
    R.set_state(c, run.info.run_id, R.RunState.STOPPED_EARLY, f"stopped by the time budget after epoch {epochs}")
