"""The Ray cluster a study runs on: joining or starting it, and what it can give a trial."""

from __future__ import annotations

import os

from trainables import compat
from trainables.errors import InputError
from trainables.import_ahead import CHAINED_HOOK, SWITCH as IMPORT_AHEAD
from tuner.console import console
from tuner.study_config import StudyConfig


def cluster_address(address: str | None) -> str | None:
    """The cluster a command joins: ``--address``, else ``RAY_ADDRESS`` (as a Ray job sets it), else
    None: a cluster of its own, as the CLI says. (Ray's own default would join whatever cluster `ray
    start` last left on this machine, and `serve` would then shut down that cluster's Serve on exit.)"""
    return address or os.environ.get("RAY_ADDRESS") or None


def connect(address: str | None, runtime_env: dict | None = None, dashboard: bool = True,
            setup_hook: str | None = None) -> None:
    """Join the cluster at ``address`` (``auto``, ``HOST:PORT``, ``ray://...``), or start a local one
    (:func:`cluster_address`), with Ray's dashboard unless ``dashboard`` is false (a study's own
    cluster: the dashboard's start is about 2.5 s of the study's before any trial starts).
    ``setup_hook``: Ray's ``worker_process_setup_hook`` for this job's workers, as ``module.function``;
    ``QLORA_TUNE_WORKER_SETUP_HOOK`` (tests inject faults with it) is then passed to the workers for
    that hook to run first (:mod:`trainables.import_ahead`), else it is the hook itself."""
    import logging

    import ray

    compat.tolerate_deleted_checkpoints()
    if ray.is_initialized():
        return
    address = cluster_address(address)
    env_vars = {k: os.environ[k] for k in ("QLORA_TUNE_HOME", "QLORA_TUNE_SMOLLM2_GGUF", "HF_HUB_OFFLINE",
                                           "MLFLOW_TRACKING_URI") if k in os.environ}
    # trials keep training while MLflow is away: fail fast per request, TrialRun keeps and resends
    env_vars.update({k: os.environ.get(k, v) for k, v in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"),
                                                           ("MLFLOW_HTTP_REQUEST_TIMEOUT", "15"))})
    extra = dict(runtime_env or {})
    chained = os.environ.get(CHAINED_HOOK)
    if setup_hook and chained:
        env_vars[CHAINED_HOOK] = chained
    hook = setup_hook or chained
    if hook:  # Ray's worker_process_setup_hook: `module.function` run in every worker process at start
        extra["worker_process_setup_hook"] = hook
        if "PYTHONPATH" in os.environ:  # where the hook's module is found
            env_vars["PYTHONPATH"] = os.environ["PYTHONPATH"]
    if IMPORT_AHEAD in os.environ:
        env_vars[IMPORT_AHEAD] = os.environ[IMPORT_AHEAD]
    if address:  # joining a cluster with token authentication: use the token here, as `ray start` does
        compat.enable_ray_token_auth_if_available()
    host = (address or "").removeprefix("ray://").split(":")[0]
    kw = compat.loopback_node_kwargs() if host in ("127.0.0.1", "localhost") else {}
    try:
        if not address:
            kw["include_dashboard"] = dashboard
        ray.init(address=address or "local", logging_level=logging.WARNING, log_to_driver=False,
                 runtime_env={"env_vars": env_vars, **extra}, configure_logging=True, **kw)
    except ConnectionError as e:
        raise InputError(f"--address {address}: cannot connect to a Ray cluster ({str(e).splitlines()[0]})") from None


def check_resources(study: StudyConfig, source: str, cluster: dict[str, float]) -> dict[str, float]:
    """Resources per trial that this cluster can satisfy, or a clear error before any trial starts."""
    r = study.resources_per_trial
    gpus = r.workers * r.gpus_per_worker if r.workers > 1 else (0.0 if r.gpu == "auto" else r.gpu)
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


def local_gpus() -> int:
    """GPUs of this machine that a local cluster would have (Ray's count; torch stays unimported)."""
    try:
        return compat.local_gpu_count()
    except Exception:  # noqa: BLE001
        return 0


