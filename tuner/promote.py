"""``qlora-tune promote``: best trial -> test-split check -> pyfunc model -> registry + alias."""

from __future__ import annotations

import tempfile
from pathlib import Path

from trainables import layout as L
from trainables import runs as R
from trainables.errors import InputError
from tuner.console import console


def promote(name: str, metric: str | None, model_name: str | None, alias: str, force: bool,
            refit: bool = False) -> dict:
    """Register the best trial's model. ``refit`` trains its configuration again on train plus eval
    for the number of epochs its adapter was selected at, and registers that model instead; the
    registry keeps both test figures."""
    import mlflow

    from trainables.data import load_dataset
    from trainables.metrics import report, write_reports
    from trainables.predict import Classifier
    from tuner.registry import log_classifier
    from tuner.records import StudyRecord

    rec = StudyRecord.load(name)
    study = rec.study
    metric = metric or study.metric
    best = best_trial(rec, metric)
    col = f"best_{metric}"
    c = R.client(rec.tracking_uri)
    data = load_dataset(study.data)
    if data.test is None:
        raise InputError(f"study '{name}': the data has no test split (set data.test or data.split.test)")
    model_name = model_name or f"qlora-tune-{name}"
    with tempfile.TemporaryDirectory(prefix="qlt-promote-") as d:
        folder = Path(c.download_artifacts(best["run_id"], L.RUN_MODEL_ARTIFACT, d))
        console.print(f"evaluating trial {best['trial_id']} ({best['approach']}, eval {metric} {best[col]:.4f}) "
                      f"on the test split ({len(data.test)} rows)")
        clf = Classifier(folder)
        pred = clf.predict(data.test.texts)
        rep = report(data.test.labels, pred.probabilities.argmax(1), data.label_names)
        refit_tags: dict[str, str] = {}
        if refit:
            before = rep
            folder, clf, epochs, rows = _refit(folder, data, Path(d) / "refit")
            pred = clf.predict(data.test.texts)
            rep = report(data.test.labels, pred.probabilities.argmax(1), data.label_names)
            refit_tags = {"refit": "true", "refit_epochs": str(epochs), "refit_train_rows": str(rows),
                          **{f"test_{k}_without_refit": f"{before[k]:.6f}" for k in ("accuracy", "f1_macro")}}
            console.print(f"refit on train + eval ({rows} rows, {epochs} epoch(s)): test accuracy "
                          f"{rep['accuracy']:.4f} (without refit {before['accuracy']:.4f})")
        key = metric.removeprefix("eval_")
        test_value = rep[key] if key != "loss" else None
        if test_value is None:  # loss: use accuracy for the guard
            key, test_value = "accuracy", rep["accuracy"]
        _guard(c, model_name, alias, f"test_{key}", test_value, force)
        tags = {R.STUDY_TAG: name, "mlflow.parentRunId": rec.parent_run_id,
                "trial_id": str(best["trial_id"]), "trial_run_id": best["run_id"],
                "data_fingerprint": rec.data_fingerprint, "approach": str(best["approach"])}
        with R.promotion_run(rec.tracking_uri, rec.experiment_id, f"promote {best['trial_id']}", tags) as run:
            mlflow.log_metrics({f"test_{k}": rep[k] for k in ("accuracy", "f1_macro", "balanced_accuracy")})
            if refit:
                mlflow.log_metrics({f"test_{k}_without_refit": before[k] for k in ("accuracy", "f1_macro", "balanced_accuracy")})
                mlflow.set_tags(refit_tags)
            mlflow.log_metric(f"eval_{metric.removeprefix('eval_')}", float(best[col]))
            plots = Path(d) / "test-plots"
            write_reports({"test": rep}, plots)
            mlflow.log_artifacts(str(plots), "test")
            info = log_classifier(folder, clf=clf)
        mv = mlflow.register_model(info.model_uri, model_name, tags={
            "study": name, "trial_id": str(best["trial_id"]), "trial_run_id": best["run_id"],
            "promotion_run_id": run.info.run_id, "data_fingerprint": rec.data_fingerprint,
            "approach": str(best["approach"]), f"test_{key}": f"{test_value:.6f}",
            "test_accuracy": f"{rep['accuracy']:.6f}", metric: f"{float(best[col]):.6f}", **refit_tags,
        })
    c.set_registered_model_alias(model_name, alias, mv.version)
    console.print(f"[bold]registered[/] {model_name} version {mv.version} as @{alias}: "
                  f"test accuracy {rep['accuracy']:.4f}, macro-F1 {rep['f1_macro']:.4f}")
    console.print(f"use it: qlora-tune predict --model models:/{model_name}@{alias} --text \"...\"")
    return {"model_name": model_name, "version": mv.version, "alias": alias, "test": rep,
            "uri": f"models:/{model_name}@{alias}"}


def _refit(folder: Path, data, out: Path):
    """Train the configuration in model folder ``folder`` again on train + eval, for the epochs its
    adapter was selected at (no eval split left to select on: the last epoch is kept). Returns the
    new folder, its classifier, the epochs and the training rows."""
    import json

    import yaml

    from trainables.config import RunConfig
    from trainables.data import Dataset, Split
    from trainables.loop import Trainer
    from trainables.predict import Classifier

    cfg = RunConfig.model_validate(yaml.safe_load((folder / L.CONFIG).read_text()))
    cfg.training.epochs = int(json.loads((folder / L.RUN_INFO).read_text()).get("best_epoch") or cfg.training.epochs)
    both = Split(data.train.texts + data.eval.texts, data.train.labels + data.eval.labels)
    trainer = Trainer(cfg, Dataset(data.label_names, both, None, data.test, sources=data.sources),
                      log=lambda line: console.print(f"refit {line}"))
    out = trainer.save_output(out, trainer.fit())
    del trainer
    return out, Classifier(out), cfg.training.epochs, len(both.texts)


def best_trial(rec, metric: str):
    """The row (see :func:`tuner.summary.study_rows`) of the trial with the best ``metric`` among those
    that hold a model, with the value in column ``best_<metric>``."""
    from tuner.summary import study_rows

    mode = "min" if metric.endswith("loss") else "max"
    df = study_rows(rec)
    col = f"best_{metric}"
    if not len(df):
        raise InputError(f"study '{rec.name}': has no trials yet")
    if col not in df.columns:
        if metric != rec.study.metric:
            df[col] = [_best_of(rec, r, metric, mode) for r in df["run_id"]]
        else:
            raise InputError(f"--metric {metric}: not recorded by study '{rec.name}'")
    df = df[df[col].notna() & df["state"].isin([s.value for s in R.RunState if s.has_model])]
    if not len(df):
        raise InputError(f"study '{rec.name}': no finished trial with {metric} to promote")
    return df.loc[df[col].idxmax() if mode == "max" else df[col].idxmin()]


def _best_of(rec, run_id: str, metric: str, mode: str) -> float | None:
    hist = R.client(rec.tracking_uri).get_metric_history(run_id, metric)
    vals = [m.value for m in hist]
    return (max if mode == "max" else min)(vals) if vals else None


def _guard(c, model_name: str, alias: str, key: str, value: float, force: bool) -> None:
    """Refuse to move ``alias`` to a model worse on the test split than its holder (unless forced)."""
    try:
        holder = c.get_model_version_by_alias(model_name, alias)
    except Exception:  # noqa: BLE001 - no such model or alias yet
        return
    theirs = holder.tags.get(key)
    if theirs is None:
        return
    if value < float(theirs) and not force:
        raise InputError(
            f"{model_name}@{alias} (version {holder.version}) has {key} {float(theirs):.4f}; this trial has "
            f"{value:.4f}: not moving the alias (pass --force to promote anyway)"
        )
