"""Run and resume a study: Ray Tune + Optuna TPE + ASHA, every trial a child run in MLflow."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from datetime import datetime
from pathlib import Path

from trainables import runlog as R
from trainables.errors import InputError
from trainables.paths import home
from trainables.trial import TrialContext, train_trial
from tuner import tracking
from tuner.console import console
from tuner.study_config import StudyConfig, load_study

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclasses.dataclass
class StudyRecord:
    """What ``resume``/``status``/``promote`` need to find a study again (``study.json``)."""

    name: str
    source: str
    config: dict
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    storage_path: str
    created: str
    data_fingerprint: str = ""
    state: str = "running"

    @staticmethod
    def folder(name: str) -> Path:
        return home() / "studies" / name

    def save(self) -> None:
        f = self.folder(self.name)
        f.mkdir(parents=True, exist_ok=True)
        tmp = f / "study.json.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        os.replace(tmp, f / "study.json")

    @classmethod
    def load(cls, name: str) -> "StudyRecord":
        f = cls.folder(name) / "study.json"
        if not f.is_file():
            known = sorted(p.name for p in (home() / "studies").glob("*") if (p / "study.json").is_file()) \
                if (home() / "studies").is_dir() else []
            hint = f" (known: {', '.join(known[-10:])})" if known else " (no studies yet)"
            raise InputError(f"study '{name}': not found{hint}")
        return cls(**json.loads(f.read_text()))

    @property
    def study(self) -> StudyConfig:
        return StudyConfig.model_validate(self.config)

    @property
    def experiment_path(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"


def latest_study() -> str:
    root = home() / "studies"
    recs = sorted(root.glob("*/study.json"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not recs:
        raise InputError("no studies yet: start one with `qlora-tune run STUDY.yaml`")
    return recs[-1].parent.name


# ------------------------------------------------------------------ Ray


def connect(address: str | None, runtime_env: dict | None = None) -> None:
    import logging

    import ray

    from tuner.ray_compat import tolerate_deleted_checkpoints

    tolerate_deleted_checkpoints()
    if ray.is_initialized():
        return
    env_vars = {k: os.environ[k] for k in ("QLORA_TUNE_HOME", "QLORA_TUNE_SMOLLM2_GGUF", "HF_HUB_OFFLINE")
                if k in os.environ}
    # trials keep training while MLflow is away: fail fast per request, TrialRun keeps and resends
    env_vars.update({k: os.environ.get(k, v) for k, v in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"),
                                                           ("MLFLOW_HTTP_REQUEST_TIMEOUT", "15"))})
    if address:  # joining a cluster: use its token if one is here, as `ray start` does
        try:
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available,
            )

            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        except ImportError:  # older Ray: no token authentication
            pass
    kw = {}
    host = (address or "").removeprefix("ray://").split(":")[0]
    if host in ("127.0.0.1", "localhost"):
        kw["_node_ip_address"] = "127.0.0.1"  # a loopback-only cluster: join it as a loopback node
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                 runtime_env={"env_vars": env_vars, **(runtime_env or {})}, configure_logging=True, **kw)
    except ConnectionError as e:
        raise InputError(f"--address {address}: cannot connect to a Ray cluster ({str(e).splitlines()[0]})") from None


def check_resources(study: StudyConfig, source: str, cluster: dict[str, float]) -> dict[str, float]:
    """Resources per trial that this cluster can satisfy, or a clear error before any trial starts."""
    r = study.resources_per_trial
    gpus = r.workers * r.gpus_per_worker if r.workers > 1 else r.gpu
    have_gpu, have_cpu = cluster.get("GPU", 0.0), cluster.get("CPU", 0.0)
    if gpus > 0 and have_gpu == 0 and gpus < 1 and r.workers == 1:
        console.print(f"[yellow]warning[/]: resources_per_trial.gpu={gpus} but the cluster has no GPU; trials run on CPU")
        gpus = 0.0
    elif gpus > have_gpu:
        raise InputError(f"{source}: resources_per_trial: a trial needs {gpus:g} GPU(s) but the cluster has {have_gpu:g}")
    cpus = r.cpu * r.workers
    if cpus > have_cpu:
        raise InputError(f"{source}: resources_per_trial.cpu: a trial needs {cpus:g} CPUs but the cluster has {have_cpu:g}")
    return {"cpu": r.cpu, "gpu": gpus}


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


# ------------------------------------------------------------------ run / resume


def _context(rec: StudyRecord, res: dict[str, float]) -> TrialContext:
    s = rec.study
    r = s.resources_per_trial
    return TrialContext(study=rec.name, run_config=s.run_config().dump(), cpus_per_trial=res["cpu"],
                        tracking_uri=rec.tracking_uri, experiment_id=rec.experiment_id,
                        parent_run_id=rec.parent_run_id, metric=s.metric, max_epochs=s.scheduler.max_epochs,
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
    r = study.resources_per_trial
    if study.max_concurrent_trials or r.workers == 1:
        return study.max_concurrent_trials
    fits = [cluster.get("CPU", 0.0) / (res["cpu"] * r.workers)]
    if res["gpu"] > 0:
        fits.append(cluster.get("GPU", 0.0) / res["gpu"])
    return max(1, int(min(fits) + 1e-9))


def run_study(path: Path, overrides: list[str], name: str | None, address: str | None) -> StudyRecord:
    from ray import tune

    study, space = load_study(path, overrides)
    name = name or f"{Path(path).stem}-{datetime.now():%Y%m%d-%H%M%S}"
    if not NAME_RE.match(name):
        raise InputError(f"--name {name!r}: use letters, digits, '-', '_' and '.' (at most 100)")
    if (StudyRecord.folder(name) / "study.json").exists():
        raise InputError(f"study '{name}' already exists; continue it with `qlora-tune resume {name}` or pick another --name")
    if address is None:  # a local cluster: what it will have is known before Ray starts
        import psutil

        check_resources(study, str(path), {"GPU": _local_gpus(), "CPU": psutil.cpu_count()})
    from trainables.data import load_dataset

    data = load_dataset(study.data)  # bad data fails here, before Ray starts
    uri = tracking.resolve_tracking_uri(study.tracking.tracking_uri)
    tracking.require_server(uri)
    connect(address)
    import ray

    res = check_resources(study, str(path), ray.cluster_resources())
    c = R.client(uri)
    exp_id = tracking.experiment_id(c, study.tracking.experiment, study.tracking.artifact_location)
    parent = c.create_run(exp_id, run_name=name, tags={
        R.STUDY_TAG: name, R.KIND_TAG: "study", R.STATE_TAG: "running",
        "data_fingerprint": data.fingerprint(), "versions": json.dumps(_versions()),
    })
    rec = StudyRecord(name=name, source=str(Path(path).resolve()), config=study.model_dump(mode="json"),
                      tracking_uri=uri, experiment_id=exp_id, parent_run_id=parent.info.run_id,
                      storage_path=study.storage or str(home() / "ray_results"),
                      created=datetime.now().isoformat(timespec="seconds"), data_fingerprint=data.fingerprint())
    rec.save()
    try:
        R.log_params(c, rec.parent_run_id, {"study": {k: v for k, v in rec.config.items() if k != "search"},
                                            "search_space": space.describe()})
        R.log_datasets(c, rec.parent_run_id, data)
        c.log_text(rec.parent_run_id, json.dumps(rec.config, indent=2), "study_config.json")
        c.log_text(rec.parent_run_id, json.dumps(space.describe(), indent=2), "search_space.json")
        tuner = tune.Tuner(_trainable(rec, res),
                           tune_config=_tune_config(study, space, _concurrency(study, res, ray.cluster_resources())),
                           run_config=_run_config(rec, study))
    except BaseException as e:  # the parent run must not stay RUNNING
        from tuner.summary import finalize_study

        finalize_study(rec, interrupted=True, seconds=0.0, reason=f"{type(e).__name__}: {e}")
        raise
    workers = f" x {study.resources_per_trial.workers} workers" if study.resources_per_trial.workers > 1 else ""
    console.print(f"[bold]study[/] {name}: {study.num_trials} trials, approaches {space.approaches(study.approach)}, "
                  f"{res} per trial{workers}; MLflow experiment '{study.tracking.experiment}'")
    console.print(f"[bold]MLflow UI[/]: {tracking.runs_link(uri, exp_id, name) or uri}", soft_wrap=True)
    return _fit(tuner, rec)


def resume_study(name: str, address: str | None) -> StudyRecord:
    from ray import tune

    rec = StudyRecord.load(name)
    if rec.state == "completed":
        console.print(f"study {name} is already complete")
        return rec
    tracking.require_server(rec.tracking_uri) if rec.tracking_uri.startswith("http") else None
    connect(address)
    import ray

    res = check_resources(rec.study, name, ray.cluster_resources())
    if not tune.Tuner.can_restore(rec.experiment_path):
        raise InputError(f"study '{name}': nothing to resume at {rec.experiment_path} (the driver died before Ray saved any state)")
    c = R.client(rec.tracking_uri)
    c.update_run(rec.parent_run_id, status="RUNNING")
    c.set_tag(rec.parent_run_id, R.STATE_TAG, "running")
    rec.state = "running"
    rec.save()
    console.print(f"[bold]resuming[/] {name} from {rec.experiment_path}")
    tuner = tune.Tuner.restore(rec.experiment_path, trainable=_trainable(rec, res), resume_errored=True)
    return _fit(tuner, rec)


def _tune_config(study: StudyConfig, space, max_concurrent: int | None):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from tuner.searcher import make_searcher

    sch = study.scheduler
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=sch.max_epochs, grace_period=sch.grace_period,
                               reduction_factor=sch.reduction_factor)
                 if sch.type == "asha" else FIFOScheduler())
    return tune.TuneConfig(
        metric=study.metric, mode=study.mode, num_samples=study.num_trials, scheduler=scheduler,
        search_alg=make_searcher(space, study.approach, study.seed, study.num_trials, sch.max_epochs,
                                 study.metric, study.mode),
        max_concurrent_trials=max_concurrent,
        reuse_actors=_reuse_actors(study), time_budget_s=study.time_budget_s,
    )


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
    from tuner.callbacks import StudyCallback

    return tune.RunConfig(
        name=rec.name, storage_path=rec.storage_path, verbose=0,
        checkpoint_config=tune.CheckpointConfig(num_to_keep=study.keep_checkpoints,
                                                checkpoint_score_attribute=study.metric,
                                                checkpoint_score_order=study.mode),
        failure_config=tune.FailureConfig(max_failures=study.max_failures),
        callbacks=[StudyCallback(rec.name, rec.tracking_uri, rec.experiment_id, rec.parent_run_id, study.scheduler.max_epochs,
                                 study.metric, study.mode)],
    )


def _fit(tuner, rec: StudyRecord) -> StudyRecord:
    import signal

    from tuner.summary import finalize_study

    t0 = time.time()
    interrupted = False
    before = signal.getsignal(signal.SIGINT)
    try:
        results = tuner.fit()
        # Ray Tune catches Ctrl-C itself and returns normally; its handler puts the previous one back
        # only when it fired, so a handler that is no longer Ray's means the study was interrupted
        after = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, before)
        ray_handles = not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0"))
        ctrl_c = ray_handles and getattr(after, "__name__", "") != "signal_interrupt_tune_run"
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
        finalize_study(rec, interrupted=True, seconds=time.time() - t0, reason=f"{type(e).__name__}: {e}")
        raise
    finalize_study(rec, interrupted=interrupted, seconds=time.time() - t0)
    if interrupted:
        console.print(f"[yellow]study {rec.name} interrupted[/]; continue it with `qlora-tune resume {rec.name}`")
        raise KeyboardInterrupt
    return rec


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("qlora-tune", "ray", "torch", "transformers", "peft", "bitsandbytes", "optuna", "mlflow"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            pass
    return out
