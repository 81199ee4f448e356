"""The Ray Tune trial: one training run that reports every epoch with a checkpoint and logs to
its own MLflow child run.

With ``workers > 1`` the trial is data-parallel: it runs a Ray Train ``TorchTrainer`` whose workers
train one adapter together (:mod:`trainables.distributed`); worker 0 logs to MLflow and writes the
checkpoint, and the trial relays each epoch's report and checkpoint to Tune, so ASHA, resuming and
promotion see exactly what a single-worker trial gives them.

The checkpoint holds ``state/`` (adapter, optimizer, scheduler, history: what resuming needs) and
``model/`` (the output-folder layout of the best epoch so far: what promotion needs). The search
never sees the test split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

from trainables import import_ahead
from trainables import layout as L
from trainables import params as P
from trainables import worker_cache
from trainables.errors import OOM_REASON, OutOfGPUMemory



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
    max_epochs: int
    gpu_per_trial: float
    """GPUs the whole trial holds (all workers together), for the ``gpu_seconds`` metric."""
    workers: int = 1
    gpus_per_worker: float = 0.0
    storage_path: str = ""
    reuse: bool = False
    """Tune reuses this trial's actor: keep the tokenizer, tokenized splits and quantized base for the next trial."""


def trial_config(ctx: TrialContext, params: dict[str, Any]):
    """The trial's RunConfig: the study's fixed settings with the sampled ``params`` (by config key) applied."""
    import copy

    from trainables.config import RunConfig, set_dotted

    tree = copy.deepcopy(ctx.run_config)
    for k, v in params.items():
        set_dotted(tree, k, v)
    return RunConfig.model_validate(tree)


def train_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    """Ray Tune function trainable."""
    entered = time.time()
    import_wait = import_ahead.wait()
    import ray.tune as tune

    from trainables.models import worker_device

    tc = tune.get_context()
    if ctx.workers > 1:
        _run_data_parallel(params, ctx, tc.get_trial_id(), tc.get_trial_name(), tune.get_checkpoint())
        return

    def report(metrics: dict, folder: Path | None) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder) if folder else None)

    _train(params, ctx, tc.get_trial_id(), tc.get_trial_name(), tune.get_checkpoint(), report, dev=worker_device(),
           entered=entered, import_wait=import_wait)


def _train(params: dict[str, Any], ctx: TrialContext, trial_id: str, trial_name: str, checkpoint, report,
           dev=None, entered: float | None = None, import_wait: float | None = None) -> None:
    """Train one trial's adapter (on one worker, or as one worker of a data-parallel trial), calling
    ``report(metrics, checkpoint_folder_or_None)`` every epoch. Only worker 0 logs and checkpoints.
    ``entered``: when the trial's function began; ``import_wait``: how long it waited for its worker's
    imports ahead (its run records both)."""
    import torch

    from trainables.data import load_dataset
    from trainables.distributed import rank_and_world
    from trainables.loop import Trainer, write_artifacts
    from trainables.runs import TrialRun

    params = P.from_trial(params)
    cfg = trial_config(ctx, params)
    if ctx.cpus_per_trial >= 1:  # per trial, or per worker of a data-parallel trial
        torch.set_num_threads(int(ctx.cpus_per_trial))
    main = rank_and_world()[0] == 0
    run = TrialRun(ctx, trial_id, trial_name, cfg, params, entered=entered, import_wait=import_wait) if main else None
    if run and run.out_of_memory:  # Ray retries a failed trial; these settings would run out again
        raise OutOfGPUMemory(f"{run.out_of_memory} (in an earlier attempt; not retried)")
    started = time.time()
    trainer = None
    out_of_memory = None
    try:
        with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as d:
            if d and Trainer.checkpoint_epoch(Path(d) / L.CHECKPOINT_STATE) >= ctx.max_epochs:
                # restored from its final checkpoint: the trial had ended (its run completed before)
                if run and not run.completed:
                    run.complete(Path(d) / L.CHECKPOINT_MODEL, time.time() - started)
                return
            data = load_dataset(cfg.data)
            data.test = None  # the search never sees the test split
            if run and not d:
                run.log_data(data)
            # with reused actors a Ray worker runs trial after trial: it tokenizes and quantizes once
            trainer = Trainer(cfg, data, dev=dev, log=lambda *_: None, reuse=ctx.reuse)
            if d:
                trainer.load_checkpoint(Path(d) / L.CHECKPOINT_STATE)
        if run:
            run.sync_history(trainer.history)
            run.log_metrics({"setup_seconds": trainer.setup_seconds,
                             **{f"setup_{k}_seconds": v for k, v in trainer.setup_parts.items()}}, step=trainer.epoch)

        noted: list[str] = []  # a failed CUDA-graph capture, told once
        checkpoints = [0.0]  # seconds spent writing and reporting this attempt's epoch checkpoints so far

        def on_epoch(rep, tr) -> None:
            m = dict(rep.metrics)
            m["train_seconds_total"] = sum(h["train_seconds"] for h in tr.history)
            m["eval_seconds_total"] = sum(h.get("eval_seconds", 0.0) for h in tr.history)
            m["graphs_seconds_total"] = sum(h.get("graphs_seconds", 0.0) for h in tr.history)
            m["checkpoint_seconds_total"] = checkpoints[0]  # up to the previous epoch's: this one's follows the log
            m["gpu_seconds"] = ctx.gpu_per_trial * (m["train_seconds_total"] + m["eval_seconds_total"])
            if not main:
                if rep.epoch == ctx.max_epochs:
                    tr.finish()  # the final evaluation is collective: take part in it
                report(m, None)
                return
            run.log_metrics(m, step=rep.epoch)  # before reporting: Ray may stop the trial there
            if tr.step_graphs is not None and tr.step_graphs.failed and not noted:
                noted.append(tr.step_graphs.failed)
                print(f"qlora-tune: trial {trial_name}: a training step could not be captured in a CUDA graph "
                      f"({tr.step_graphs.failed}); it trains on with eager steps")
                run.graphs_failed(tr.step_graphs.failed)
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="qlt-ckpt-") as d:
                tr.save_checkpoint(Path(d) / L.CHECKPOINT_STATE)
                if rep.epoch == ctx.max_epochs:
                    # last epoch: full reports of the selected adapter, logged by the trial itself
                    t1 = time.perf_counter()
                    write_artifacts(Path(d) / L.CHECKPOINT_MODEL, tr, tr.finish())
                    run.log_metrics({"final_report_seconds": time.perf_counter() - t1}, step=rep.epoch)
                    run.complete(Path(d) / L.CHECKPOINT_MODEL, time.time() - started)
                else:
                    tr.write_best_model(Path(d) / L.CHECKPOINT_MODEL)
                report(m, Path(d))
            checkpoints[0] += time.perf_counter() - t0

        trainer.fit(on_epoch)
    except torch.cuda.OutOfMemoryError as e:
        out_of_memory = (f"{OOM_REASON} with training.batch_size {cfg.training.batch_size} and "
                         f"training.max_length {cfg.training.max_length} ({str(e).splitlines()[0][:200]})")
        worker_cache.clear("model")  # the model a reused worker keeps goes too: the next trial builds its own
    finally:  # the error's frames (and the tensors they hold) are gone by now: free the memory
        del trainer
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if out_of_memory:
        if run:
            run.ran_out_of_memory(out_of_memory)
        raise OutOfGPUMemory(out_of_memory)


# ------------------------------------------------------------------ data-parallel trials


def _train_worker(config: dict) -> None:
    """One Ray Train worker of a data-parallel trial."""
    import_wait = import_ahead.wait()
    import ray.train
    import ray.train.torch
    import torch

    dev = ray.train.torch.get_device()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    ctx = TrialContext(**config["ctx"])

    def report(metrics: dict, folder: Path | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)
        # go on only once Tune has taken the epoch: if ASHA stops the trial here, no worker trains
        # (and logs) an epoch nobody asked for
        if torch.distributed.get_rank() == 0:
            config["ack"].get()
        torch.distributed.barrier()

    _train(config["params"], ctx, config["trial_id"], config["trial_name"], config["checkpoint"], report, dev=dev,
           import_wait=import_wait)


def _relay_callback(queue):
    """A Ray Train callback that hands worker 0's report and checkpoint to the Tune trial."""
    from ray.train import UserCallback

    class Relay(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            queue.put((metrics[0], checkpoint))

    return Relay()


def _run_data_parallel(params: dict[str, Any], ctx: TrialContext, trial_id: str, trial_name: str, checkpoint) -> None:
    """Run the trial as a TorchTrainer (``ctx.workers`` workers) and relay its reports to Tune."""
    import threading

    import ray.train
    import ray.tune as tune
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    queue, ack = (Queue(maxsize=1, actor_options={"num_cpus": 0}) for _ in range(2))
    name = f"{trial_name}-dp-{int(time.time())}"
    storage = f"{ctx.storage_path.rstrip('/')}/{ctx.study}/_data_parallel"  # a folder or s3://...
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"params": params, "ctx": dataclasses.asdict(ctx), "trial_id": trial_id,
                           "trial_name": trial_name, "checkpoint": checkpoint, "ack": ack},
        scaling_config=ray.train.ScalingConfig(
            num_workers=ctx.workers, use_gpu=ctx.gpus_per_worker > 0,
            resources_per_worker={"CPU": ctx.cpus_per_trial, "GPU": ctx.gpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage, callbacks=[_relay_callback(queue)],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=0)),  # Tune's max_failures restarts the trial
    )
    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial below
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="data-parallel-trial", daemon=True)
    thread.start()
    try:
        while thread.is_alive() or not queue.empty():
            try:
                metrics, ckpt = queue.get(timeout=1)
            except Empty:
                continue
            if ckpt is None:
                tune.report(metrics)
            else:
                with ckpt.as_directory() as d:
                    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
            ack.put(True)
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
    finally:
        _remove(f"{storage}/{name}")  # Tune holds its own copy of each checkpoint


def _remove(location: str) -> None:
    """Delete a folder, local or on a pyarrow filesystem (``s3://...``); nothing if it is gone."""
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(location) if "://" in location else (pafs.LocalFileSystem(), location)
        fs.delete_dir(path)
    except (FileNotFoundError, OSError):
        pass
