"""Driver-side Tune callback: progress (a live trials table on a terminal, one line per trial state
change otherwise), and closing the MLflow run of each trial that
ends outside the trial's own code (stopped by ASHA, or errored, or lost with a driver that died)."""

from __future__ import annotations

import time
from pathlib import Path

from ray.tune import Callback

from trainables import layout as L
from trainables import params as P
from trainables import runs as R
from trainables.errors import OutOfGPUMemory
from tuner import storage


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
    last = lines[-1] if lines else "unknown error"
    if f"{OutOfGPUMemory.__name__}: " in last:  # the reason is the message ("out of GPU memory ...")
        last = last.split(f"{OutOfGPUMemory.__name__}: ", 1)[1]
    return last[:500]


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
            self._close(trial, R.RunState.STOPPED_EARLY, f"stopped early after epoch {epochs}")
            self._line(trial, f"stopped early after epoch {epochs}")
        else:  # the trial closes its own run after its last epoch; this covers a crash in between
            self._close(trial, R.RunState.COMPLETED, None, only_if_open=True)
            self._line(trial, "completed")
        self._print(trials, force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        reason = _reason(trial)
        self._close(trial, R.RunState.ERRORED, reason)
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
                    R.drop_lost_run(c, run.info.run_id, "started by a driver that died before Ray recorded "
                                                        "the trial; the resumed study does not continue it")
        except Exception as e:  # noqa: BLE001 - tracking must not kill a study
            from tuner.console import err_console

            err_console.print(f"warning: could not check MLflow for lost trial runs: {e}")

    def _close(self, trial, state: R.RunState, reason: str | None, only_if_open: bool = False) -> None:
        """End the trial's run in ``state``, attaching its best checkpoint's model folder when the
        trial could not (stopped early). Never raises: tracking must not kill a study."""
        try:
            c = R.client(self.uri)
            run_id = self._run_id(trial)
            if run_id is None:  # failed before the trial could open its run: record it anyway
                params = P.from_trial(trial.config)
                run_id = R.open_trial_run_after_failure(c, self.exp_id, self.study, self.parent, trial.trial_id,
                                                        str(params.get("approach", "")), params)
            if only_if_open and R.state_of(c.get_run(run_id)) is R.RunState.COMPLETED:
                return
            uploaded = False
            if state.has_model and trial.checkpoint is not None:
                with trial.checkpoint.as_directory() as d:
                    model = Path(d) / L.CHECKPOINT_MODEL
                    if model.is_dir():
                        c.log_artifacts(run_id, str(model), L.RUN_MODEL_ARTIFACT)
                        uploaded = True
            R.set_state(c, run_id, state, reason)
            if uploaded and state is R.RunState.STOPPED_EARLY:
                storage.drop_checkpoints(trial)  # its best adapter is in MLflow now; nothing resumes a stopped trial
        except Exception as e:  # noqa: BLE001
            from tuner.console import err_console

            err_console.print(f"warning: could not update MLflow for trial {trial.trial_id}: {e}")

