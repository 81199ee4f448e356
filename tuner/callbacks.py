"""Driver-side Tune callback: progress (a live trials table on a terminal, one line per trial state
change otherwise), and closing the MLflow run of each trial that
ends outside the trial's own code (stopped by ASHA, or errored, or lost with a driver that died)."""

from __future__ import annotations

import time
from pathlib import Path

from ray.tune import Callback

from trainables import runlog as R


def _reason(trial) -> str:
    """Last line of the trial's error trace (the local error file is written before callbacks run;
    the copy in storage may not be synced yet)."""
    text = ""
    try:
        if trial.error_file and Path(trial.error_file).is_file():
            text = Path(trial.error_file).read_text()
        if not text:
            err = trial.get_error()
            text = str(err) if err else ""
    except Exception:  # noqa: BLE001
        pass
    lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
    return (lines[-1] if lines else "unknown error")[:500]


class StudyCallback(Callback):
    """Picklable (Ray stores it with the experiment state so ``resume`` gets it back)."""

    def __init__(self, study: str, tracking_uri: str, experiment_id: str, parent_run_id: str, max_epochs: int,
                 metric: str, mode: str):
        self.study, self.uri, self.exp_id, self.parent = study, tracking_uri, experiment_id, parent_run_id
        self.max_epochs, self.metric, self.mode = max_epochs, metric, mode
        self._last_print = 0.0

    def _run_id(self, trial) -> str | None:
        runs = R.find_runs(R.client(self.uri), self.exp_id, self.study, "trial", trial.trial_id, self.parent)
        return runs[0].info.run_id if runs else None

    # ----------------------------------------------------------- progress

    def on_trial_start(self, iteration, trials, trial, **info):
        self._line(trial, "started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._print(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        epochs = trial.last_result.get("epoch", 0)
        if epochs < self.max_epochs:
            self._close(trial, "stopped_early", f"stopped early after epoch {epochs}", "FINISHED")
            self._line(trial, f"stopped early after epoch {epochs}")
        else:  # the trial closes its own run after its last epoch; this covers a crash in between
            self._close(trial, "completed", None, "FINISHED", only_if_running=True)
            self._line(trial, "completed")
        self._print(trials, force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        reason = _reason(trial)
        self._close(trial, "errored", reason, "FAILED")
        self._line(trial, f"errored: {reason}")
        self._print(trials, force=True)

    def on_experiment_end(self, trials, **info):
        self._drop_lost_runs(trials)

    def _print(self, trials, force: bool = False) -> None:
        """The live table, on a terminal only (redrawn tables are noise in a log or a file)."""
        from tuner.console import console
        from tuner.summary import live_table

        if console.is_terminal and (force or time.time() - self._last_print > 15):
            self._last_print = time.time()
            console.print(live_table(trials, self.metric, self.mode, self.max_epochs))

    def _line(self, trial, what: str) -> None:
        """One line per trial state change where stdout is not a terminal (CI logs, files, nohup)."""
        from tuner.console import console
        from tuner.summary import trial_line

        if not console.is_terminal:
            console.print(trial_line(trial, what, self.metric, self.max_epochs), soft_wrap=True)

    # ----------------------------------------------------------- MLflow

    def _drop_lost_runs(self, trials) -> None:
        """Delete the open runs of trials this experiment does not know: a driver that died started
        them after Ray's last snapshot, and the resumed study sampled other trials in their place.
        Each trial keeps one run; a lost one is tagged and only soft-deleted (``mlflow runs restore``)."""
        try:
            known = {t.trial_id for t in trials}
            c = R.client(self.uri)
            for run in R.find_runs(c, self.exp_id, self.study, "trial", parent_run_id=self.parent):
                if run.info.status == "RUNNING" and run.data.tags.get(R.TRIAL_TAG) not in known:
                    c.set_tag(run.info.run_id, R.STATE_TAG, "lost")
                    c.set_tag(run.info.run_id, R.REASON_TAG, "started by a driver that died before Ray recorded "
                                                             "the trial; the resumed study does not continue it")
                    c.set_terminated(run.info.run_id, "KILLED")
                    c.delete_run(run.info.run_id)
        except Exception as e:  # noqa: BLE001 - tracking must not kill a study
            from tuner.console import err_console

            err_console.print(f"warning: could not check MLflow for lost trial runs: {e}")

    def _close(self, trial, state: str, reason: str | None, status: str, only_if_running: bool = False) -> None:
        """Tag the trial's final state, attach its best checkpoint's model folder when the trial
        could not (stopped early), and end the run. Never raises: tracking must not kill a study."""
        try:
            c = R.client(self.uri)
            run_id = self._run_id(trial)
            if run_id is None:  # failed before the trial could open its run: record it anyway
                tags = {R.STUDY_TAG: self.study, R.KIND_TAG: "trial", R.TRIAL_TAG: trial.trial_id,
                        "approach": str(trial.config.get("approach", "")), "mlflow.parentRunId": self.parent}
                run_id = c.create_run(self.exp_id, run_name=f"{trial.trial_id} (failed at start)", tags=tags).info.run_id
                R.log_params(c, run_id, {"search": {k.split(":", 1)[-1]: v for k, v in trial.config.items()}})
            run = c.get_run(run_id)
            if only_if_running and run.data.tags.get(R.STATE_TAG) == "completed":
                return
            if state in ("stopped_early", "completed") and trial.checkpoint is not None:
                with trial.checkpoint.as_directory() as d:
                    model = Path(d) / "model"
                    if model.is_dir():
                        c.log_artifacts(run_id, str(model), "model")
            c.set_tag(run_id, R.STATE_TAG, state)
            if reason:
                c.set_tag(run_id, R.REASON_TAG, reason)
            c.set_terminated(run_id, status)
        except Exception as e:  # noqa: BLE001
            from tuner.console import err_console

            err_console.print(f"warning: could not update MLflow for trial {trial.trial_id}: {e}")
