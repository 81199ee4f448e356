"""Studies on a real Ray cluster with a real MLflow server: search, ASHA, tracking, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, learnable_csv, run_cli, tiny_config, tiny_study
from trainables import runs as R


def _children(rec):
    c = R.client(rec.tracking_uri)
    return c, R.find_runs(c, rec.experiment_id, rec.name, "trial", parent_run_id=rec.parent_run_id)


def test_study_over_both_approaches_with_asha(finished_study):
    rec = finished_study
    c, runs = _children(rec)
    assert len(runs) == 6
    assert {r.data.tags["approach"] for r in runs} == {"head", "generation"}
    states = [r.data.tags[R.STATE_TAG] for r in runs]
    assert "stopped_early" in states and "completed" in states, states
    assert all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        steps = sorted(m.step for m in c.get_metric_history(r.info.run_id, "eval_f1_macro"))
        assert steps == list(range(1, len(steps) + 1)) and steps, steps  # one point per epoch
        want = 4 if r.data.tags[R.STATE_TAG] == "completed" else len(steps)
        assert len(steps) == want
        arts = {a.path for a in c.list_artifacts(r.info.run_id, "model")}
        assert "model/adapter" in arts and "model/plots" in arts, arts
    parent = c.get_run(rec.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial_id"]
    assert {"trials.csv", "metric_by_epoch.png", "best_config.yaml", "summary.json", "param_importances.png",
            "parallel_coordinate.png"} <= {a.path for a in c.list_artifacts(rec.parent_run_id)}
    s = run_cli("status", "both-approaches")
    assert s.returncode == 0 and "best trial" in s.stdout and "saved" in s.stdout, s.stdout + s.stderr
    best = parent.data.tags["best_trial_id"]
    assert best in s.stdout
    assert "most important" in s.stdout and "approach" in s.stdout.split("most important")[1], s.stdout
    # storage stays bounded: a stopped trial's checkpoints go once its best adapter is in MLflow
    exp = Path(rec.experiment_path)
    for r in runs:
        folder = next(p for p in exp.iterdir() if r.data.tags[R.TRIAL_TAG] in p.name)
        kept = list(folder.glob("checkpoint_*"))
        assert len(kept) == (0 if r.data.tags[R.STATE_TAG] == "stopped_early" else 1), (folder, kept)  # the newest
    assert parent.data.metrics["storage_bytes"] > 0 and "stopped trials keep none" in s.stdout, s.stdout
    # Tune's own result files, but not its TensorBoard files (importing that logger imports torch)
    assert len(list(exp.glob("*/result.json"))) == len(runs) and not list(exp.glob("*/events.out.tfevents*"))
    # where the trials' time went: every part measured, together no more than the runs lasted
    m = parent.data.metrics
    shares = [m[f"trial_time_share_{k}"] for k in ("training", "evaluation", "setup", "checkpoints", "final_report",
                                                      "graph_capture", "other")]
    assert all(v > 0 for v in shares[:5]) and sum(shares) == pytest.approx(1.0), m
    assert m["trial_time_share_graph_capture"] == 0, m  # steps are graphed on a GPU only (cuda_graphs: auto)
    for r in runs:
        m = r.data.metrics
        assert 0 < m["train_seconds_total"] < (r.info.end_time - r.info.start_time) / 1000
        assert (m.get("final_report_seconds", 0) > 0) == (r.data.tags[R.STATE_TAG] == "completed"), m
        parts = [m[f"setup_{k}_seconds"] for k in ("data", "base", "adapters", "optimizer")]  # what set-up spent
        assert sum(parts) == pytest.approx(m["setup_seconds"]) and min(parts) >= 0, m
    assert "time in trials" in s.stdout and "training" in s.stdout.split("time in trials")[1], s.stdout
    # what came before the first trial: the driver's steps, then the first trial's process starting
    m, wall = parent.data.metrics, (parent.info.end_time - parent.info.start_time) / 1000
    # (the first trial's part in three: waiting for its process, Tune handing it the trial, the trial's
    # function until its run opened)
    first = min(runs, key=lambda r: r.info.start_time)
    trial = ("trial_process", "trial_schedule", "trial_imports")
    parts = {k: m[f"before_first_trial_{k}_seconds"] for k in ("load", "ray", "gpu_auto", "tracking", *trial)}
    assert all(v >= 0 for v in parts.values()) and parts["load"] > 0 and parts["trial_imports"] > 0, parts
    assert m["before_first_trial_seconds"] == pytest.approx(sum(parts.values())), m
    entered = float(first.data.tags[R.ENTERED_TAG])
    assert parts["trial_imports"] == pytest.approx(first.info.start_time / 1000 - entered, abs=0.01), parts
    assert float(first.data.tags[R.PROCESS_STARTED_TAG]) <= entered
    # every trial's worker had begun the trial's imports ahead (the study's setup hook), and said how long it waited
    assert all(float(r.data.tags[R.IMPORT_WAIT_TAG]) >= 0 for r in runs), [r.data.tags for r in runs]
    assert sum(parts[k] for k in trial) < first.info.start_time / 1000 - parent.info.start_time / 1000 < wall
    assert "before the first trial" in s.stdout and "the trial's imports until its run opened" in s.stdout, s.stdout


def test_warm_start_gives_optuna_the_old_trials_where_the_spaces_agree(finished_study, tmp_path, yaml_file, ray_cluster):
    import pickle

    old_c, old_runs = _children(finished_study)
    r8 = sum(r.data.params.get("search.lora.r") == "8" for r in old_runs)
    cfg = tiny_study(learnable_csv(tmp_path / "d.csv"), num_trials=2, **{"scheduler.type": "none", "scheduler.max_epochs": 1})
    cfg["search"] = {"approach": {"choice": ["head", "generation"]}, "lora.r": {"choice": [4, 16]},
                     "training.warmup_ratio": {"uniform": [0.0, 0.1]}}
    p = run_cli("run", yaml_file(cfg), "--name", "warm", "--address", ray_cluster, "--warm-start", finished_study.name,
                timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = " ".join(p.stdout.split())
    assert f"warm start from {finished_study.name}: 6 trial(s) carried over" in out, out[:3000]
    assert f"training.warmup_ratio: not searched by {finished_study.name} (6 trial(s)" in out
    assert "head.class_weights: not in this space" in out
    assert (f"lora.r: outside this space in {r8} trial(s)" in out) == (r8 > 0), out[:3000]
    from tuner.records import StudyRecord

    rec = StudyRecord.load("warm")
    assert R.client(rec.tracking_uri).get_run(rec.parent_run_id).data.tags["warm_start_trials"] == "6"
    # Optuna's study inside the saved searcher holds the 6 old trials and the 2 new ones
    state = pickle.loads(max(Path(rec.experiment_path).glob("searcher-state-*.pkl")).read_bytes())
    trials = state["_ot_study"].trials
    assert len(trials) == 8 and sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials[:6]) == 6
    # the first new trials rerun the old study's best of each approach, with what carries over
    from tuner.study_config import StudyConfig, parse_search
    from tuner.summary import study_rows
    from tuner.warm_start import warm_trials

    df = study_rows(finished_study)
    new = StudyConfig.model_validate(cfg)
    _, notes, first = warm_trials(finished_study, new, parse_search(new, "s.yaml"))
    assert not any("its rerun may be cut" in n for n in notes), notes
    short = new.model_copy(update={"time_budget_s": 0.5})  # shorter than any old trial: its user is told
    cut = [n for n in warm_trials(finished_study, short, parse_search(short, "s.yaml"))[1] if "rerun may be cut" in n]
    assert len(cut) == 1 and cut[0].startswith(f"{first[0]['approach']}: {finished_study.name}'s best trial ran"), cut
    by_approach = df.groupby("approach")["best_eval_f1_macro"].max()
    values = [by_approach[p["approach"]] for p in first]
    assert len(first) == 2 and values == sorted(values, reverse=True), (first, by_approach)  # the best first
    swapped = StudyConfig.model_validate({**cfg, "search": {**cfg["search"], "approach": {"choice": ["generation", "head"]}}})
    again = warm_trials(finished_study, swapped, parse_search(swapped, "s.yaml"))[2]
    assert by_approach.nunique() == 1 or [p["approach"] for p in again] == [p["approach"] for p in first]  # by value
    for point in first:
        same = df[df["approach"] == point["approach"]]
        tops = same[same["best_eval_f1_macro"] == same["best_eval_f1_macro"].max()]  # one of them, if tied
        assert point.get("lora.r") in [int(r) if r in ("4", "16") else None for r in tops["lora.r"]], (point, tops)
    assert [{k: t.params[k] for k in p} for t, p in zip(trials[6:], first)] == first


@pytest.mark.parametrize("reuse", [False, True], ids=["fresh-actors", "reused-actors"])
def test_driver_sigkill_then_resume_completes_with_one_run_per_trial(tmp_path, yaml_file, ray_cluster, mlflow_server,
                                                                     reuse):
    name = f"killed-{reuse}".lower()
    # reused workers skip most of a trial's set-up: more rows keep the study running until the kill
    cfg = tiny_study(learnable_csv(tmp_path / "d.csv", repeats=400 if reuse else 150), num_trials=4,
                     reuse_actors=reuse, **{"scheduler.type": "none", "scheduler.max_epochs": 3})
    cfg["search"] = {"approach": {"choice": ["head"]}, "training.learning_rate": {"loguniform": [1e-3, 1e-2]}}
    study = yaml_file(cfg, name="study.yaml")
    env = {**os.environ}
    proc = _start(study, name, ray_cluster, env=env)
    from tuner.records import StudyRecord

    # wait until Ray's saved state of the study knows a finished trial
    _wait_for(lambda: "TERMINATED" in _saved_trial_states(StudyRecord.load(name)).values(), every=0.5)
    rec = StudyRecord.load(name)
    assert proc.poll() is None, "the study finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _, before = _children(rec)
    done_before = {r.data.tags[R.TRIAL_TAG] for r in before if r.data.tags.get(R.STATE_TAG) == "completed"}
    p = run_cli("resume", name, "--address", ray_cluster, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rec = StudyRecord.load(name)
    c, runs = _children(rec)
    ids = [r.data.tags[R.TRIAL_TAG] for r in runs]
    assert len(ids) == len(set(ids)) == 4, ids
    assert all(r.info.status == "FINISHED" and r.data.tags[R.STATE_TAG] == "completed" for r in runs)
    for r in runs:  # finished trials were not run again: their metric history has one point per epoch
        hist = c.get_metric_history(r.info.run_id, "train_loss")
        if r.data.tags[R.TRIAL_TAG] in done_before:
            assert sorted(m.step for m in hist) == [1, 2, 3]
    assert c.get_run(rec.parent_run_id).info.status == "FINISHED"


INVALID = [
    ("unknown-key", {"schedular": {}}, "schedular: unknown key (did you mean 'scheduler'?)"),
    ("bad-distribution", {"search": {"training.learning_rate": {"lognormal": [1, 2]}}}, "unknown distribution 'lognormal'"),
    ("inverted-bounds", {"search": {"training.learning_rate": {"loguniform": [1e-2, 1e-4]}}}, "must be below high"),
    ("unknown-search-key", {"search": {"training.lr": {"choice": [1]}}}, "search.training.lr: not a key of the run config"),
    ("invalid-choice-value", {"search": {"lora.r": {"choice": [8, 0]}}}, "value 0 is invalid"),
    ("misplaced-conditional", {"search": {"approach": {"choice": ["head", "generation"]},
                                          "head.class_weights": {"choice": ["none"]}}}, "put it under search.head"),
    ("empty-space", {"search": {}}, "empty search space"),
    ("grace-over-max", {"scheduler": {"max_epochs": 2, "grace_period": 3}}, "grace_period (3) must not exceed max_epochs (2)"),
    ("gpu-on-cpu-cluster", {"resources_per_trial": {"cpu": 1, "gpu": 1}}, "needs 1 GPU(s) but the cluster has 0"),
    ("gpu-with-workers", {"resources_per_trial": {"workers": 2, "gpu": 1}}, "give GPUs per worker as gpus_per_worker"),
    ("workers-gpus-on-cpu-cluster", {"resources_per_trial": {"workers": 2, "gpus_per_worker": 1}},
     "needs 2 GPU(s) but the cluster has 0"),
    ("bad-data", {"data": {"train": "/no/such.csv"}}, "/no/such.csv: data file not found"),
]


@pytest.mark.parametrize("command", [["run", "--name", "never"], ["plan"]], ids=["run", "plan"])
@pytest.mark.parametrize("over,expect", [(i[1], i[2]) for i in INVALID], ids=[i[0] for i in INVALID])
def test_invalid_study_exits_2_before_ray_starts(tmp_path, yaml_file, cli, over, expect, command):
    import ray

    cfg = tiny_study(learnable_csv(tmp_path / "d.csv"))
    cfg.update(over)
    code, out, err = cli(command[0], yaml_file(cfg), *command[1:])
    assert code == 2, out + err
    assert expect in err and len(err.strip().splitlines()) == 1, err
    assert not ray.is_initialized()


def test_plan_shows_what_run_would_do_and_runs_nothing(tmp_path, yaml_file, ray_cluster):
    """`plan` checks the study on the cluster and prints its trials, space and resources; no study
    record, no MLflow run (it needs no tracking server)."""
    from tuner.records import StudyRecord

    cfg = tiny_study(learnable_csv(tmp_path / "d.csv"), max_concurrent_trials=None, num_trials=5,
                     **{"tracking.tracking_uri": "http://127.0.0.1:9"})  # nothing listens there
    before = set(StudyRecord.folder("x").parent.glob("*")) if StudyRecord.folder("x").parent.exists() else set()
    p = run_cli("plan", yaml_file(cfg), "--address", ray_cluster, "--set", "lora.dropout=0.05")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = " ".join(p.stdout.split())
    # the cluster has 2 CPUs, a trial takes 1: two at once
    assert "5 trials, approaches ['head', 'generation'], {'cpu': 1.0, 'gpu': 0.0} per trial; up to 2 at once" in out, out
    assert "lora.r: choice [4, 8]" in out and "head: head.class_weights: choice ['none', 'balanced']" in out, out
    after = set(StudyRecord.folder("x").parent.glob("*")) if StudyRecord.folder("x").parent.exists() else set()
    assert after == before


def test_the_driver_reads_a_study_without_torch(tmp_path, yaml_file):
    """The CLI and a study's driver import neither torch nor transformers (seconds of a study's start
    before its first trials, on a GPU machine): the config reads every approach's settings, the data
    loads, the local GPUs are counted, Tune's settings (searcher and its first trials, scheduler) are
    made, and what the driver imports once Ray runs comes without them."""
    path = yaml_file(tiny_study(learnable_csv(tmp_path / "d.csv")))
    code = (
        "import importlib, pathlib, sys\n"
        "import tuner.cli, tuner.study as S\n"
        "from tuner.console import quiet_libraries\n"
        "quiet_libraries()\n"
        f"study, space, _ = S._load(pathlib.Path({str(path)!r}), ['approach=generation'], None)\n"
        "S._tune_config(study, space, None)\n"
        "[importlib.import_module(m) for m in S.AFTER_RAY]\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == "[]", p.stdout


def test_fractional_gpu_on_cpu_cluster_warns_and_runs_on_cpu():
    from tuner.ray_cluster import check_resources
    from tuner.study_config import StudyConfig

    s = StudyConfig.model_validate({"data": {"train": "x.csv"}, "resources_per_trial": {"cpu": 1, "gpu": 0.25}})
    assert check_resources(s, "s.yaml", {"CPU": 2.0})["gpu"] == 0.0


def test_mlflow_ui_shows_the_study_and_its_trials(finished_study):
    """Headless Chromium opens the MLflow UI: the parent run is listed and expands to its trials."""
    import shutil

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("chromium/chromedriver not installed (Debian packages chromium, chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.conftest import ARTIFACTS

    rec = finished_study
    c, runs = _children(rec)
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", "--window-size=1600,1000"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        from tuner.tracking import run_link, runs_link

        drv.get(runs_link(rec.tracking_uri, rec.experiment_id, rec.name))
        wait = WebDriverWait(drv, 90)
        link = wait.until(EC.presence_of_element_located((By.XPATH, f"//a[normalize-space()='{rec.name}']")))
        if not runs[0].info.run_name in drv.page_source:  # collapsed: open the parent's expander
            link.find_element(By.XPATH, "./preceding::button[1]").click()
        for r in runs:
            wait.until(EC.presence_of_element_located((By.XPATH, f"//a[normalize-space()='{r.info.run_name}']")))
        # the model-training view, filtered to this study, with each run's data named
        body = drv.find_element(By.TAG_NAME, "body").text
        assert "Traces overview" not in body and "Dataset" in body, body[:500]
        digest = c.get_run(runs[0].info.run_id).inputs.dataset_inputs[0].dataset.digest
        assert f"train ({digest})" in body, body[:2000]
        assert rec.name in drv.find_element(By.XPATH, "//input[contains(@placeholder, '')]").get_attribute("value") \
            or rec.name in body
        ARTIFACTS.mkdir(exist_ok=True)
        drv.save_screenshot(str(ARTIFACTS / "mlflow-ui-study.png"))
        # a trial's run page, as status links it: a training run, not an evaluation
        drv.get(run_link(rec.tracking_uri, rec.experiment_id, runs[0].info.run_id))
        wait.until(EC.presence_of_element_located((By.XPATH, "//*[contains(text(), 'Parameters')]")))
        crumbs = drv.find_element(By.TAG_NAME, "body").text
        assert "Evaluations" not in crumbs, crumbs[:500]
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        drv.save_screenshot(str(ARTIFACTS / "mlflow-ui-run.png"))
        drv.quit()


def _wait_for(pred, timeout=300, every=1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            v = pred()
            if v:
                return v
        except Exception:  # noqa: BLE001 - not there yet
            pass
        time.sleep(every)
    raise AssertionError("timed out waiting")


def _saved_trial_states(rec) -> dict[str, str]:
    """Trial id -> status in Ray's latest saved snapshot of the study (what ``resume`` starts from)."""
    import glob
    import json as _json

    files = sorted(glob.glob(f"{rec.experiment_path}/experiment_state-*.json"))
    if not files:
        return {}
    states = {}
    for trial, _ in _json.loads(Path(files[-1]).read_text())["trial_data"]:
        t = _json.loads(trial) if isinstance(trial, str) else trial
        states[t["trial_id"]] = t["status"]
    return states


def _epochs_reported(rec) -> int:
    """Results a study's trials have reported to Ray so far (lines of their result.json files)."""
    import glob

    return sum(len(Path(f).read_text().splitlines()) for f in glob.glob(f"{rec.experiment_path}/*/result.json"))


def _start(cfg_file, name: str, address: str, **kw) -> subprocess.Popen:
    """`qlora-tune run` as a real process (to kill or interrupt it)."""
    kw.setdefault("stdout", subprocess.DEVNULL)
    kw.setdefault("stderr", subprocess.DEVNULL)
    return subprocess.Popen([sys.executable, "-m", "tuner.cli", "run", str(cfg_file), "--name", name,
                             "--address", address], cwd=ROOT, **kw)


def _first_epoch_logged(name: str):
    """Wait until a trial of study ``name`` has logged an epoch; returns that trial's run."""
    from tuner.records import StudyRecord

    def check():
        c, runs = _children(StudyRecord.load(name))
        return next((r for r in runs if c.get_metric_history(r.info.run_id, "train_loss")), None)
    return _wait_for(check)


def test_killed_trial_worker_resumes_from_its_checkpoint(tmp_path, yaml_file, ray_cluster, mlflow_server):
    """SIGKILL the process running a trial mid-training: Ray restarts the trial from its last
    checkpoint and MLflow keeps one run for it with one point per epoch."""
    cfg = tiny_study(learnable_csv(tmp_path / "d.csv", repeats=60), num_trials=1, max_failures=2,
                     **{"scheduler.type": "none", "scheduler.max_epochs": 4})
    cfg["search"] = {"training.learning_rate": {"loguniform": [1e-3, 1e-2]}}
    proc = _start(yaml_file(cfg), "worker-kill", ray_cluster)
    from tuner.records import StudyRecord

    run = _first_epoch_logged("worker-kill")
    pid = int(run.data.tags[R.PID_TAG])
    os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=900) == 0
    rec = StudyRecord.load("worker-kill")
    c, runs = _children(rec)
    assert len(runs) == 1
    r = c.get_run(runs[0].info.run_id)
    assert r.data.tags[R.STATE_TAG] == "completed" and r.data.tags.get("resumed") == "true"
    assert int(r.data.tags[R.PID_TAG]) != pid
    steps = sorted(m.step for m in c.get_metric_history(r.info.run_id, "train_loss"))
    assert sorted(set(steps)) == [1, 2, 3, 4], steps


def test_failing_trial_is_errored_with_reason_and_the_study_goes_on(tmp_path, yaml_file, ray_cluster, mlflow_server):
    cfg = tiny_study(learnable_csv(tmp_path / "d.csv"), num_trials=4, max_failures=0,
                     **{"scheduler.type": "none", "scheduler.max_epochs": 1})
    cfg["search"] = {"approach": {"choice": ["head"]},
                     "lora.target_modules": {"choice": [["q_proj", "v_proj"], ["no_such_proj"]]}}
    p = run_cli("run", yaml_file(cfg), "--name", "with-errors", "--address", ray_cluster, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    from tuner.records import StudyRecord

    rec = StudyRecord.load("with-errors")
    c, runs = _children(rec)
    assert len(runs) == 4
    states = {r.data.tags[R.STATE_TAG] for r in runs}
    assert {"errored", "completed"} <= states, states
    for r in runs:
        if r.data.tags[R.STATE_TAG] == "errored":
            assert r.info.status == "FAILED" and "no_such_proj" in r.data.tags[R.REASON_TAG]
    s = run_cli("status", "with-errors")
    assert s.returncode == 0 and "errored" in s.stdout
    # with no max_concurrent_trials, Tune starts as many trials at once as the cluster holds (2 here):
    # the second trial's process starts before the first one's function begins, not after (Tune's own
    # default with a searcher: one pending trial at a time)
    first, second = sorted(runs, key=lambda r: float(r.data.tags[R.PROCESS_STARTED_TAG]))[:2]
    assert float(second.data.tags[R.PROCESS_STARTED_TAG]) < float(first.data.tags[R.ENTERED_TAG]), \
        [(r.data.tags[R.PROCESS_STARTED_TAG], r.data.tags[R.ENTERED_TAG]) for r in (first, second)]


def test_trials_out_of_gpu_memory_end_errored_unretried_and_counted(tmp_path, yaml_file, ray_cluster, mlflow_server):
    """A trial whose step raises CUDA's out-of-memory error (injected into every worker through Ray's
    worker setup hook: generation trials) ends errored with the reason 'out of GPU memory ...'; Ray's
    retry of it ends at once; the head trials go on and complete; the summary counts the failures.
    The head trials' CUDA-graph captures fail too (injected): they complete with eager steps, their
    runs say why, and the summary counts them."""
    cfg = tiny_study(learnable_csv(tmp_path / "d.csv"), num_trials=3, max_failures=1,
                     **{"scheduler.type": "none", "scheduler.max_epochs": 1, "training.cuda_graphs": True})
    cfg["search"] = {"approach": {"choice": ["head", "generation"]}}  # the first two trials: one of each
    env = {"QLORA_TUNE_WORKER_SETUP_HOOK": "tests.faults.head_graphs_fail_and_generation_runs_out_of_gpu_memory",
           "PYTHONPATH": str(ROOT)}
    p = run_cli("run", yaml_file(cfg), "--name", "oom", "--address", ray_cluster, env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    from tuner.records import StudyRecord

    c, runs = _children(StudyRecord.load("oom"))
    by_approach: dict[str, list] = {}
    for r in runs:
        by_approach.setdefault(r.data.tags["approach"], []).append(r)
    assert by_approach.get("generation") and by_approach.get("head"), {a: len(v) for a, v in by_approach.items()}
    for r in by_approach["generation"]:
        reason = r.data.tags[R.REASON_TAG]
        assert r.data.tags[R.STATE_TAG] == "errored" and r.info.status == "FAILED"
        assert reason.startswith("out of GPU memory with training.batch_size 8"), reason
        assert reason.endswith("(in an earlier attempt; not retried)"), reason  # the retry did not train
    assert all(r.data.tags[R.STATE_TAG] == "completed" for r in by_approach["head"])
    assert all("injected by tests/faults.py" in r.data.tags[R.GRAPHS_FAILED_TAG] for r in by_approach["head"])
    assert all(r.data.metrics["graphs_seconds_total"] > 0 for r in by_approach["head"])  # the warm-ups ran
    n = len(by_approach["generation"])
    assert f"{n} ran out of GPU memory" in p.stdout, p.stdout[-2000:]
    assert f"{len(by_approach['head'])} trial(s) trained with eager steps after a failed capture" in p.stdout, p.stdout[-2000:]


def test_a_trial_cut_by_the_time_budget_keeps_its_best_epoch(tmp_path, yaml_file, ray_cluster, mlflow_server):
    """The time budget ends the study with its trial mid-way: the trial's best epoch so far counts (its
    run ends stopped early, with the model of its newest checkpoint) and promotion may pick it."""
    cfg = tiny_study(learnable_csv(tmp_path / "d.csv", repeats=40), num_trials=1, time_budget_s=45,
                     **{"scheduler.type": "none", "scheduler.max_epochs": 200})
    cfg["search"] = {"approach": {"choice": ["head"]}}
    p = run_cli("run", yaml_file(cfg), "--name", "budget", "--address", ray_cluster, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    from tuner.records import StudyRecord

    rec = StudyRecord.load("budget")
    c, runs = _children(rec)
    assert len(runs) == 1
    r = c.get_run(runs[0].info.run_id)
    epochs = max(m.step for m in c.get_metric_history(r.info.run_id, rec.study.metric))
    assert 1 <= epochs < 200
    assert r.data.tags[R.STATE_TAG] == "stopped_early" and r.info.status == "FINISHED"
    assert r.data.tags[R.REASON_TAG] == f"stopped by the time budget after epoch {epochs}"
    assert "model/adapter" in {a.path for a in c.list_artifacts(r.info.run_id, "model")}
    assert c.get_run(rec.parent_run_id).data.tags["best_trial_id"] == r.data.tags[R.TRIAL_TAG]
    p = run_cli("promote", "budget", "--model-name", "budget-model")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]


def test_ctrl_c_stops_cleanly_and_the_study_resumes(tmp_path, yaml_file, ray_cluster, mlflow_server):
    cfg = tiny_study(learnable_csv(tmp_path / "d.csv", repeats=400), num_trials=3,
                     **{"scheduler.type": "none", "scheduler.max_epochs": 3})
    cfg["search"] = {"approach": {"choice": ["head"]}, "training.learning_rate": {"loguniform": [1e-3, 1e-2]}}
    proc = _start(yaml_file(cfg), "ctrl-c", ray_cluster, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    from tuner.records import StudyRecord

    _first_epoch_logged("ctrl-c")
    _wait_for(lambda: _saved_trial_states(StudyRecord.load("ctrl-c")), every=0.5)  # Ray saved the study once
    assert proc.poll() is None, "the study finished before it could be interrupted; make it longer"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    assert "qlora-tune resume ctrl-c" in out
    rec = StudyRecord.load("ctrl-c")
    c, runs = _children(rec)
    assert c.get_run(rec.parent_run_id).info.status == "KILLED"
    assert all(r.info.status != "RUNNING" for r in runs), "no run is left RUNNING"
    p = run_cli("resume", "ctrl-c", "--address", ray_cluster, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    c, runs = _children(StudyRecord.load("ctrl-c"))
    assert len(runs) == 3 and all(r.data.tags[R.STATE_TAG] == "completed" for r in runs)
    assert c.get_run(rec.parent_run_id).info.status == "FINISHED"


def test_two_studies_at_once_keep_their_runs_apart(tmp_path, yaml_file, ray_cluster, mlflow_server):
    cfg = tiny_study(learnable_csv(tmp_path / "d.csv"), num_trials=2, max_concurrent_trials=1,
                     **{"scheduler.type": "none", "scheduler.max_epochs": 1})
    cfg["search"] = {"approach": {"choice": ["head"]}, "training.learning_rate": {"loguniform": [1e-3, 1e-2]}}
    f = yaml_file(cfg)
    procs = [_start(f, n, ray_cluster) for n in ("twin-a", "twin-b")]
    assert [p.wait(timeout=900) for p in procs] == [0, 0]
    from tuner.records import StudyRecord

    ids = []
    for n in ("twin-a", "twin-b"):
        rec = StudyRecord.load(n)
        c, runs = _children(rec)
        assert len(runs) == 2 and all(r.data.tags[R.STUDY_TAG] == n for r in runs)
        ids += [r.info.run_id for r in runs]
    assert len(set(ids)) == 4


def test_mlflow_server_away_mid_study_loses_no_metric(tmp_path, yaml_file, ray_cluster, mlflow_server):
    """Stop the tracking server after the first epoch, bring it back on the same port: the trial
    keeps training, and every epoch ends up in its run."""
    import json as _json

    from trainables.paths import home
    from tuner import tracking

    cfg = tiny_study(learnable_csv(tmp_path / "d.csv", repeats=60), num_trials=1,
                     **{"scheduler.type": "none", "scheduler.max_epochs": 5})
    cfg["search"] = {"training.learning_rate": {"loguniform": [1e-3, 1e-2]}}
    proc = _start(yaml_file(cfg), "mlflow-away", ray_cluster)
    from tuner.records import StudyRecord

    _first_epoch_logged("mlflow-away")
    port = _json.loads((home() / "mlflow" / "server.json").read_text())["port"]
    assert tracking.stop_embedded_server()
    rec = StudyRecord.load("mlflow-away")
    reported = _epochs_reported(rec)
    # the trial trains on, and reports two more epochs to Ray, while its metrics cannot be logged
    _wait_for(lambda: _epochs_reported(rec) >= reported + 2 or proc.poll() is not None, every=0.5)
    assert tracking.embedded_server(port=port) == mlflow_server
    assert proc.wait(timeout=900) == 0
    rec = StudyRecord.load("mlflow-away")
    c, runs = _children(rec)
    assert len(runs) == 1 and runs[0].data.tags[R.STATE_TAG] == "completed"
    steps = sorted({m.step for m in c.get_metric_history(runs[0].info.run_id, "eval_f1_macro")})
    assert steps == [1, 2, 3, 4, 5]


def test_reused_actors_run_trial_after_trial_in_one_worker(tmp_path, yaml_file, ray_cluster, mlflow_server):
    """``reuse_actors: true``: one Ray worker runs the trials one after another and only the first
    loads the base; every trial still gets its own MLflow run and result."""
    cfg = tiny_study(learnable_csv(tmp_path / "d.csv", repeats=4), num_trials=3, max_concurrent_trials=1,
                     reuse_actors=True, **{"scheduler.type": "none", "scheduler.max_epochs": 1})
    cfg["search"] = {"approach": {"choice": ["head"]}, "training.learning_rate": {"loguniform": [1e-3, 1e-2]}}
    p = run_cli("run", yaml_file(cfg, "study.yaml"), "--name", "reused", "--address", ray_cluster, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # stdout is not a terminal here: one line per trial state change, no live table, a link to the
    # model-training view of the study's runs
    lines = p.stdout.splitlines()
    assert sum(l.startswith("trial ") and l.endswith(" started") for l in lines) == 3, p.stdout[-3000:]
    assert sum(l.startswith("trial ") and " completed: epoch 1/1, eval_f1_macro " in l for l in lines) == 3
    assert "trials (eval_f1_macro" not in p.stdout  # the live table's title
    assert "workflowType=machine_learning" in p.stdout and "reused" in p.stdout
    from tuner.records import StudyRecord

    rec = StudyRecord.load("reused")
    c, runs = _children(rec)
    assert len(runs) == 3 and all(r.data.tags[R.STATE_TAG] == "completed" for r in runs)
    assert len({r.data.tags[R.PID_TAG] for r in runs}) == 1  # one worker process ran them all
    setup = sorted((r.info.start_time, r.data.metrics["setup_seconds"]) for r in runs)
    assert setup[1][1] < setup[0][1] and setup[2][1] < setup[0][1], setup  # later trials copy the cached base


def test_trial_restored_from_its_final_checkpoint_leaves_its_run_finished(tmp_path, mlflow_server):
    """A driver killed after a trial's last epoch makes Ray restore that trial from its final
    checkpoint: the trial must end at once and leave its completed run FINISHED (not RUNNING)."""
    import shutil

    from ray import tune

    from trainables.config import RunConfig
    from trainables.trial import TrialContext, _train

    c = R.client(mlflow_server)
    exp = c.create_experiment(f"final-ckpt-{time.time_ns()}")
    run_config = RunConfig.model_validate(tiny_config(learnable_csv(tmp_path / "d.csv"))).dump()
    ctx = TrialContext(study="final-ckpt", run_config=run_config, cpus_per_trial=1, tracking_uri=mlflow_server,
                       experiment_id=exp, parent_run_id="parent", max_epochs=1,
                       gpu_per_trial=0.0)
    saved, reports = tmp_path / "ckpt", []

    def report(metrics, folder):
        reports.append(metrics)
        shutil.copytree(folder, saved)

    _train({"training.learning_rate": 5e-3}, ctx, "t1", "trial_t1", None, report)
    (run,) = R.find_runs(c, exp, "final-ckpt", "trial", "t1", "parent")
    assert (run.info.status, run.data.tags[R.STATE_TAG]) == ("FINISHED", "completed") and len(reports) == 1
    _train({"training.learning_rate": 5e-3}, ctx, "t1", "trial_t1", tune.Checkpoint.from_directory(saved), report)
    (run,) = R.find_runs(c, exp, "final-ckpt", "trial", "t1", "parent")
    assert (run.info.status, run.data.tags[R.STATE_TAG]) == ("FINISHED", "completed")
    assert len(reports) == 1  # nothing trained or reported again
    assert len(c.get_metric_history(run.info.run_id, "train_loss")) == 1


def test_runs_of_trials_lost_with_a_dead_driver_are_dropped_at_the_end(mlflow_server):
    """A driver killed after starting a trial but before Ray's next snapshot leaves that trial's run
    open, and the resumed study samples another trial instead: the orphan must not stay RUNNING
    (the study would call itself interrupted) nor count as a trial; known trials' runs are untouched."""
    from ray.tune.experiment import Trial

    from tuner.callbacks import StudyCallback

    c = R.client(mlflow_server)
    exp = c.create_experiment(f"lost-{time.time_ns()}")

    def trial_run(trial_id: str) -> str:
        tags = {R.STUDY_TAG: "lost", R.KIND_TAG: "trial", R.TRIAL_TAG: trial_id, "mlflow.parentRunId": "parent"}
        return c.create_run(exp, tags=tags).info.run_id

    lost, known = trial_run("ghost"), trial_run("t1")
    cb = StudyCallback("lost", mlflow_server, exp, "parent", 3, "eval_f1_macro", "max")
    cb.on_experiment_end(trials=[Trial("train_trial", config={}, trial_id="t1", stub=True)])
    ghost = c.get_run(lost)
    assert ghost.info.lifecycle_stage == "deleted" and ghost.info.status == "KILLED"
    assert ghost.data.tags[R.STATE_TAG] == "lost"
    assert c.get_run(known).info.status == "RUNNING"
    assert [r.data.tags[R.TRIAL_TAG] for r in R.find_runs(c, exp, "lost", "trial", parent_run_id="parent")] == ["t1"]


def test_first_trials_run_the_studys_own_settings_where_the_space_admits_them(tmp_path):
    """One first trial per approach, each with the study's settings (learning rate, LoRA rank, the
    head's class weights) for every searched parameter whose range admits them; the rest (here a
    warmup range that excludes the study's 0.0) is left to TPE. Optuna hands these out first."""
    from tuner.searcher import first_points, make_searcher
    from tuner.study import _run_tree
    from tuner.study_config import StudyConfig, parse_search

    cfg = tiny_study(learnable_csv(tmp_path / "d.csv"))
    cfg["search"]["training.warmup_ratio"] = {"uniform": [0.05, 0.1]}
    study = StudyConfig.model_validate(cfg)
    space = parse_search(study, "s.yaml")
    points = first_points(space, study.approach, lambda a: _run_tree(study, a))
    r = study.lora.r
    assert r in (4, 8) and study.training.learning_rate == 5e-3
    assert points == [
        {"approach": "head", "training.learning_rate": 5e-3, "lora.r": r, "head:head.class_weights": "none"},
        {"approach": "generation", "training.learning_rate": 5e-3, "lora.r": r},
    ], points
    searcher = make_searcher(space, "head", 0, 8, 2, "eval_f1_macro", "max", first=points)
    for i, point in enumerate(points):
        got = searcher.suggest(f"t{i}")
        assert {k: got[k] for k in point} == point and 0.05 <= got["training.warmup_ratio"] <= 0.1, got
    # approach fixed: one first trial, its block's parameters included
    cfg["search"] = {"lora.r": {"choice": [4, 8]}, "head": {"head.class_weights": {"choice": ["balanced", "none"]}}}
    fixed = StudyConfig.model_validate(cfg)
    got = first_points(parse_search(fixed, "s.yaml"), fixed.approach, lambda a: _run_tree(fixed, a))
    assert got == [{"lora.r": r, "head:head.class_weights": "none"}], got


def test_no_trial_starts_that_the_budget_would_cut_before_its_first_epoch(tmp_path):
    """With a time budget, once the time left is under the median time trials took to their first
    report, the searcher tells Tune it is finished; until a trial has reported, it cannot know."""
    from ray.tune.search import Searcher

    from tuner.searcher import make_searcher
    from tuner.study_config import StudyConfig, parse_search

    study = StudyConfig.model_validate(tiny_study(learnable_csv(tmp_path / "d.csv")))
    space = parse_search(study, "s.yaml")

    def searcher(budget):
        s = make_searcher(space, "head", 0, 100, 4, "eval_f1_macro", "max", time_budget_s=budget)
        for i in range(3):
            assert isinstance(s.suggest(f"t{i}"), dict)  # nothing reported yet: trials start
        for i, seconds in enumerate((30.0, 40.0, 500.0)):
            s.on_trial_result(f"t{i}", {"epoch": 1, "time_total_s": seconds, "eval_f1_macro": 0.5,
                                        "training_iteration": 1})
        return s

    assert searcher(30).suggest("late") == Searcher.FINISHED  # 30 s left at most, trials need 40 (the median)
    assert isinstance(searcher(3600).suggest("early"), dict)
    assert isinstance(make_searcher(space, "head", 0, 100, 4, "eval_f1_macro", "max").suggest("x"), dict)


def test_a_study_without_scheduler_gets_epochs_for_its_data(tmp_path):
    """No ``scheduler:``: about 32,000 examples for the longest trials, 2 to 8 epochs, or 4 epochs of
    8,000 examples beyond 16,000 rows; a study that sets its scheduler keeps it."""
    from tuner.defaults import adapt
    from tuner.study_config import StudyConfig

    base = tiny_study(learnable_csv(tmp_path / "d.csv"))
    base.pop("scheduler")
    study = StudyConfig.model_validate(base)
    assert [adapt(study, rows).scheduler.max_epochs for rows in (2_000, 9_543, 16_000, 100_000)] == [8, 4, 2, 4]
    assert adapt(study, 9_543).scheduler.grace_period == 1
    # beyond 16,000 rows, epochs of 8,000 examples: the first rung comes as soon, however large the data
    assert [adapt(study, rows).training.epoch_examples for rows in (16_000, 16_001, 100_000)] == [None, 8_000, 8_000]
    assert adapt(study, 100_000).run_config({}).training.epoch_examples == 8_000  # what the trials get
    own = StudyConfig.model_validate({**base, "training": {**base["training"], "epoch_examples": 50_000}})
    assert adapt(own, 100_000).training.epoch_examples == 50_000
    set_by_user = StudyConfig.model_validate({**base, "scheduler": {"max_epochs": 3}})
    assert adapt(set_by_user, 2_000).scheduler.max_epochs == 3 and adapt(set_by_user, 100_000).training.epoch_examples is None


def test_the_default_space_follows_the_model_size(tmp_path):
    """No ``search:``: batch sizes for the model's size, the learning-rate range scaled with them by the
    square-root rule, and (where the file leaves them out) the first trials at the median batch and the
    QLoRA recipe's rate scaled to it. A study's own settings and search are kept."""
    from tuner.defaults import adapt, default_batches, with_default_search
    from tuner.study_config import DEFAULT_SEARCH, StudyConfig, parse_search

    assert default_batches(135_000_000) == [32, 64, 128]
    assert default_batches(1_240_000_000) == [16, 32, 64]
    assert default_batches(8_030_000_000) == [8, 16, 32]
    base = tiny_study(learnable_csv(tmp_path / "d.csv"))
    base.pop("search")
    base["training"] = {k: v for k, v in base["training"].items() if k not in ("batch_size", "learning_rate")}
    study = with_default_search(StudyConfig.model_validate(base))  # the tiny model: a small one
    space = parse_search(study, "s.yaml")
    assert space.common["training.batch_size"].choice == [32, 64, 128]
    lo, hi = DEFAULT_SEARCH["training.learning_rate"]["loguniform"]
    assert space.common["training.learning_rate"].loguniform == pytest.approx([lo * 2**0.5, hi * 2**0.5], rel=1e-2)
    assert study.training.batch_size == 64 and study.training.learning_rate == pytest.approx(4e-4)
    assert study.search["approach"] == DEFAULT_SEARCH["approach"]  # the rest of the space as it was
    own = StudyConfig.model_validate({**base, "training": {**base["training"], "learning_rate": 1e-3}})
    assert with_default_search(own).training.learning_rate == 1e-3
    searched = StudyConfig.model_validate({**base, "search": {"lora.r": {"choice": [4, 8]}}})
    assert with_default_search(searched) is searched
    # adapt, which decides everything a study file leaves out, decides the space too
    assert adapt(StudyConfig.model_validate(base), 2_000).search == study.search


def test_a_budgeted_study_without_trial_count_runs_until_its_budget(tmp_path):
    """``time_budget_s`` without ``num_trials``: the budget ends the study (not 8 trials); a count the
    user gives, or no budget, keeps its count."""
    from tuner.defaults import BUDGETED_TRIALS, adapt
    from tuner.study_config import StudyConfig

    base = tiny_study(learnable_csv(tmp_path / "d.csv"))
    base.pop("num_trials", None)
    budgeted = StudyConfig.model_validate({**base, "time_budget_s": 450})
    assert adapt(budgeted, 2_000).num_trials == BUDGETED_TRIALS
    assert adapt(StudyConfig.model_validate(base), 2_000).num_trials == 8
    counted = StudyConfig.model_validate({**base, "time_budget_s": 450, "num_trials": 12})
    assert adapt(counted, 2_000).num_trials == 12
