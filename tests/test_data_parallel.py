"""Data-parallel trials: several workers train one adapter (gloo on the CPU here, NCCL on GPUs)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import free_port, learnable_csv, run_cli, tiny_config, tiny_study
from trainables import runs as R


def _train(rank: int, cfg: dict, world: int = 1, port: int = 0, out: str = "") -> dict:
    """Train one epoch (as one worker of ``world``); returns the adapter and the eval report."""
    import torch.distributed as dist

    from trainables.config import RunConfig
    from trainables.data import load_dataset
    from trainables.loop import Trainer

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    run = RunConfig.model_validate(cfg)
    tr = Trainer(run, load_dataset(run.data), log=lambda *_: None)
    result = tr.fit()
    res = {"adapter": tr.trainable_state(), "history": result.history, "eval": result.final["eval"]}
    if out and rank == 0:
        torch.save(res, out)
    if world > 1:
        dist.destroy_process_group()
    return res


def test_two_workers_train_the_same_adapter_as_one(tmp_path):
    """Each worker takes half of every global batch and the adapter's gradients are summed: two
    workers must end where one worker ends (up to float rounding), with identical metrics."""
    import torch.multiprocessing as mp

    cfg = tiny_config(learnable_csv(tmp_path / "d.csv", repeats=4), **{"training.epochs": 2})
    one = _train(0, cfg)
    out = tmp_path / "two.pt"
    mp.spawn(_train, args=(cfg, 2, free_port(), str(out)), nprocs=2, join=True)
    two = torch.load(out, weights_only=False)
    assert one["adapter"].keys() == two["adapter"].keys()
    for name, w in one["adapter"].items():
        diff = (w - two["adapter"][name]).norm() / w.norm().clamp_min(1e-8)
        assert diff < 1e-3, (name, float(diff))
    assert [h["workers"] for h in two["history"]] == [2, 2]
    for k in ("train_loss",):
        assert abs(one["history"][-1][k] - two["history"][-1][k]) < 1e-3
    # every eval example was scored once, by one of the workers
    assert one["eval"]["confusion_matrix"] == two["eval"]["confusion_matrix"]
    assert abs(one["eval"]["loss"] - two["eval"]["loss"]) < 1e-3


def test_study_with_two_worker_trials_on_gloo(tmp_path, yaml_file, ray_cluster, mlflow_server):
    """``resources_per_trial.workers: 2`` runs each trial as a Ray Train TorchTrainer; ASHA stops
    trials, checkpoints and MLflow runs look exactly like single-worker trials'."""
    cfg = tiny_study(learnable_csv(tmp_path / "d.csv", repeats=4), num_trials=3, max_concurrent_trials=1,
                     **{"training.learning_rate": 1e-2})
    cfg["search"] = {"approach": {"choice": ["head", "generation"]}, "lora.r": {"choice": [4, 8]}}
    cfg["scheduler"] = {"max_epochs": 2, "grace_period": 1, "reduction_factor": 2}
    cfg["resources_per_trial"] = {"cpu": 1, "workers": 2}
    p = run_cli("run", yaml_file(cfg, "study.yaml"), "--name", "data-parallel", "--address", ray_cluster, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    from tuner.records import StudyRecord

    rec = StudyRecord.load("data-parallel")
    c = R.client(rec.tracking_uri)
    runs = R.find_runs(c, rec.experiment_id, rec.name, "trial", parent_run_id=rec.parent_run_id)
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    states = sorted(r.data.tags[R.STATE_TAG] for r in runs)
    assert "completed" in states and "stopped_early" in states, states
    for r in runs:
        workers = c.get_metric_history(r.info.run_id, "workers")
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "eval_f1_macro")]
        # one point per epoch, and a stopped trial trained no epoch past the one ASHA cut it at
        assert steps == list(range(1, (2 if r.data.tags[R.STATE_TAG] == "completed" else 1) + 1)), steps
        assert [m.value for m in workers] == [2.0] * len(steps)
        if r.data.tags[R.STATE_TAG] == "completed":  # what promotion downloads
            assert "model/adapter" in {a.path for a in c.list_artifacts(r.info.run_id, "model")}
    # Tune holds the checkpoints (state to resume, model to promote) of every trial not stopped early
    # (a stopped trial's best adapter is in MLflow, and its checkpoints are dropped) ...
    trial_dirs = [d for d in Path(rec.experiment_path).iterdir() if d.name.startswith("train_trial")]
    assert len(trial_dirs) == 3
    state_of = {r.data.tags[R.TRIAL_TAG]: r.data.tags[R.STATE_TAG] for r in runs}
    for d in trial_dirs:
        if next(s for t, s in state_of.items() if t in d.name) == "stopped_early":
            assert not list(d.glob("checkpoint_*")), d
            continue
        assert list(d.glob("checkpoint_*/state/trainable.safetensors")), d
        assert list(d.glob("checkpoint_*/model/adapter/adapter_config.json")), d
    # ... and the Ray Train runs' own copies are gone
    assert not list((Path(rec.storage_path) / rec.name / "_data_parallel").glob("*/checkpoint_*"))
