"""The ``qlora-tune`` command line. Bad input exits 2 with one line naming the culprit."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer

from trainables.errors import InputError
from tuner.console import console, err_console, quiet_libraries

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune QLoRA text classifiers and search their hyperparameters on Ray Tune.")

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: --set training.epochs=2")]


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Run config (YAML).")],
    set_: SetOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output folder.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
):
    """Fine-tune one classifier (no search) and write its output folder."""
    from tuner.train_cmd import run_train

    out = output or Path("outputs") / f"train-{datetime.now():%Y%m%d-%H%M%S}"
    run_train(config, set_ or [], out, overwrite)


@app.command()
def predict(
    model: Annotated[str, typer.Option("--model", "-m", help="Output folder, runs:/RUN/model or models:/NAME@ALIAS.")],
    text: Annotated[Optional[list[str]], typer.Option("--text", "-t", help="Text to classify (repeatable).")] = None,
    input: Annotated[Optional[Path], typer.Option("--input", "-i", help="File of texts (csv/tsv/jsonl/parquet).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", help="Write predictions here (csv/tsv/jsonl/parquet).")] = None,
    text_column: Annotated[str, typer.Option(help="Text column of --input.")] = "text",
    generate: Annotated[bool, typer.Option("--generate", help="Also show the free-text completion (generation approach).")] = False,
    batch_size: Annotated[Optional[int], typer.Option(help="Prediction batch size.")] = None,
    address: Annotated[Optional[str], typer.Option("--address", help="Predict --input on this Ray cluster (auto, HOST:PORT) with Ray Data.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="With --address: classifier actors (default: one per GPU).")] = None,
    gpus_per_worker: Annotated[float, typer.Option(help="With --address: GPUs per actor (default: 0.5 where the cluster has GPUs: two per card).")] = 0.0,
    via_serve: Annotated[bool, typer.Option("--via-serve", help="With --address: label through the replicas of the `qlora-tune serve` running this model on the cluster (no model to load).")] = False,
):
    """Classify texts with a trained or registered model (on a Ray cluster with --address)."""
    from tuner.predict_cmd import run_predict

    if bool(text) == bool(input):
        raise InputError("predict: give either --text (one or more) or --input FILE")
    if output and not input:
        raise InputError("predict: --output needs --input")
    if address and not output:
        raise InputError("predict: --address needs --input and --output")
    if address and generate:
        raise InputError("predict: --generate does not run on a cluster; drop --address")
    if via_serve and not address:
        raise InputError("predict: --via-serve needs --address (the cluster that serves the model)")
    if via_serve and gpus_per_worker:
        raise InputError("predict: --gpus-per-worker does not apply with --via-serve (the replicas hold the GPUs)")
    if address:
        from tuner.batch_predict import predict_on_cluster
        from tuner.refs import local_model_folder

        predict_on_cluster(model if via_serve else local_model_folder(model), input, output, text_column, address,
                           batch_size, workers, gpus_per_worker, via_serve=via_serve)
        return
    run_predict(model, text or [], input, output, text_column, generate, batch_size)


Address = Annotated[Optional[str], typer.Option("--address", help="Ray cluster: auto, HOST:PORT or ray://HOST:10001 (default: start a local one).")]

Refit = Annotated[bool, typer.Option("--refit", help="gpu: auto: measure the trials' footprint again, even where the fit cache has it.")]


@app.command()
def run(
    study: Annotated[Path, typer.Argument(help="Study file (YAML).")],
    name: Annotated[Optional[str], typer.Option("--name", help="Study name (default: file name + time).")] = None,
    address: Address = None,
    set_: SetOpt = None,
    warm_start: Annotated[Optional[str], typer.Option("--warm-start", help="An earlier study (same task, older data) whose trials Optuna starts from, where the spaces agree.")] = None,
    refit: Refit = False,
):
    """Launch a hyperparameter search on Ray Tune."""
    from tuner.study import run_study

    run_study(study, set_ or [], name, address, warm_start, refit)


@app.command()
def plan(
    study: Annotated[Path, typer.Argument(help="Study file (YAML).")],
    address: Address = None,
    set_: SetOpt = None,
    refit: Refit = False,
):
    """Check a study and show what `run` would do: trials, search space, resources per trial and how
    many run at once (gpu: auto measured, and kept for the run); no trial runs."""
    from tuner.study import plan_study

    plan_study(study, set_ or [], address, refit)


@app.command()
def resume(name: Annotated[str, typer.Argument(help="Study name.")], address: Address = None):
    """Continue a study whose driver died or was interrupted."""
    from tuner.study import resume_study

    resume_study(name, address)


@app.command()
def status(name: Annotated[Optional[str], typer.Argument(help="Study name (default: the latest).")] = None):
    """Trials table, best trial, compute used and saved by early stopping."""
    from tuner.records import StudyRecord, latest_study
    from tuner.summary import print_status

    print_status(StudyRecord.load(name or latest_study()))


@app.command()
def ui(
    port: Annotated[Optional[int], typer.Option(help="Port for a newly started server.")] = None,
    stop: Annotated[bool, typer.Option("--stop", help="Stop the embedded server.")] = False,
):
    """Start (or reuse) the embedded MLflow server and print its URL."""
    from tuner import tracking

    if stop:
        console.print("stopped" if tracking.stop_embedded_server() else "no embedded server was running")
        return
    url = tracking.embedded_server(port=port)
    console.print(f"MLflow UI: {url}  (bound to 127.0.0.1; stop with `qlora-tune ui --stop`)")
    from trainables import runs as R
    from tuner.records import StudyRecord, latest_study

    try:
        rec = StudyRecord.load(latest_study())
    except InputError:  # no study yet
        rec = None
    if rec is not None and rec.tracking_uri == url:
        console.print(f"latest study '{rec.name}': {tracking.runs_link(url, rec.experiment_id, rec.name)}",
                      soft_wrap=True)
    exp = R.client(url).get_experiment_by_name("qlora-tune")
    if exp is not None:
        console.print(f"all studies: {tracking.runs_link(url, exp.experiment_id)}", soft_wrap=True)


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="Study name.")],
    metric: Annotated[Optional[str], typer.Option(help="Pick the best trial by this metric (default: the study's).")] = None,
    model_name: Annotated[Optional[str], typer.Option("--model-name", help="Registered model name (default: qlora-tune-STUDY).")] = None,
    alias: Annotated[str, typer.Option(help="Alias to point at the new version.")] = "champion",
    force: Annotated[bool, typer.Option(help="Move the alias even if the current holder is better on test.")] = False,
    refit: Annotated[bool, typer.Option(help="Train the best configuration again on train + eval (for the epochs its adapter was selected at) and register that.")] = False,
):
    """Evaluate the best trial on the test split, register it in MLflow and set the alias."""
    from tuner.promote import promote as do_promote

    do_promote(name, metric, model_name, alias, force, refit)


@app.command()
def serve(
    models: Annotated[list[str], typer.Argument(help="Models: output folders, runs:/RUN/model or models:/NAME@ALIAS; NAME=REF names one (requests pick it with \"model\").")],
    port: Annotated[int, typer.Option(help="Port of the Serve HTTP proxy.")] = 8080,
    host: Annotated[str, typer.Option(help="Interface; anything but loopback needs --insecure.")] = "127.0.0.1",
    insecure: Annotated[bool, typer.Option(help="Allow serving beyond loopback without authentication.")] = False,
    address: Address = None,
    replicas: Annotated[int, typer.Option(help="Replicas (each holds every model).")] = 1,
    min_replicas: Annotated[Optional[int], typer.Option(help="Autoscale from this many replicas (with --max-replicas).")] = None,
    max_replicas: Annotated[Optional[int], typer.Option(help="Autoscale up to this many replicas.")] = None,
    gpus_per_replica: Annotated[float, typer.Option(help="GPUs per replica, whole or a fraction (0.25: four per card).")] = 0.0,
    cpus_per_replica: Annotated[Optional[float], typer.Option(help="CPUs per replica (default: 1 with a GPU; without, a node's cores shared among the replicas: a CPU replica computes with one thread per CPU).")] = None,
    max_batch_size: Annotated[int, typer.Option(help="Most texts per forward pass, from any number of requests.")] = 64,
    batch_wait_ms: Annotated[float, typer.Option(help="How long a batch waits for more texts.")] = 5.0,
    max_texts: Annotated[int, typer.Option(help="Most texts per request.")] = 256,
    max_text_chars: Annotated[int, typer.Option(help="Longest text accepted.")] = 20_000,
    merge: Annotated[bool, typer.Option("--merge/--no-merge", help="Fold each adapter into a dequantized base (fast), or keep the base 4-bit (less memory).")] = True,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="Serve's log line per request (costs about a sixth of the requests per second).")] = False,
    ingress: Annotated[str, typer.Option(help="HTTP ingress of a cluster serve starts: haproxy (straight to the replicas, which share the HTTP work), proxy (Ray Serve's Python proxy) or auto (haproxy for GPU replicas, proxy for CPU ones). With --address, the cluster's own (RAY_SERVE_ENABLE_HA_PROXY at `ray start`).")] = "auto",
):
    """Serve classifiers on Ray Serve with request batching: POST /predict {"texts": [...]}."""
    from tuner.serve import Batching, Limits, Scaling, serve_models

    if (min_replicas is not None) and not max_replicas:
        raise InputError("serve: --min-replicas needs --max-replicas")
    if max_replicas is not None and max_replicas < (min_replicas or 1):
        raise InputError(f"serve: --max-replicas {max_replicas} is below --min-replicas {min_replicas or 1}")
    for opt, v in (("--replicas", replicas), ("--max-batch-size", max_batch_size), ("--max-texts", max_texts)):
        if v < 1:
            raise InputError(f"serve: {opt} must be at least 1")
    if gpus_per_replica < 0 or (cpus_per_replica or 0) < 0 or batch_wait_ms < 0:
        raise InputError("serve: --gpus-per-replica, --cpus-per-replica and --batch-wait-ms must not be negative")
    serve_models(models, host, port, insecure, address,
                 Scaling(replicas, min_replicas, max_replicas, gpus_per_replica, cpus_per_replica),
                 Batching(max_batch_size, batch_wait_ms), Limits(max_texts=max_texts, max_text_chars=max_text_chars),
                 merge, access_log, ingress)


@app.command()
def demo(
    name: Annotated[Optional[str], typer.Option("--name", help="Study name (default: demo + time).")] = None,
    set_: SetOpt = None,
):
    """The product in one command: search both approaches on the embedded model and demo data,
    promote the winner, classify with models:/qlora-tune-demo@champion."""
    from tuner.demo import run_demo

    run_demo(name, set_ or [])


def _exit_soon() -> None:
    """For a process that ends once the command returns: leave Ray now (its exit handler sleeps 0.5 s
    for log lines this CLI never forwards), and keep the interpreter's last garbage collections off
    the objects that live to the end (torch's, Ray's, MLflow's: about 1 s on a CPU)."""
    import gc

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    gc.freeze()


def main(argv: list[str] | None = None) -> None:
    """The command line (``argv``: given by a caller that goes on running, as the tests do)."""
    quiet_libraries()
    try:
        rv = app(args=argv, prog_name="qlora-tune", standalone_mode=False)
    except InputError as e:
        err_console.print(f"qlora-tune: error: {e}", markup=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("qlora-tune: interrupted")
        sys.exit(130)
    except Exception as e:  # usage errors of the CLI library (typer vendors its own click)
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            err_console.print(f"qlora-tune: error: {e.format_message()}", markup=False, soft_wrap=True)
            sys.exit(2)
        if type(e).__name__ in ("Exit", "Abort"):
            sys.exit(getattr(e, "exit_code", 1))
        raise
    if isinstance(rv, int) and rv:  # typer returns 130 for an interrupted command
        err_console.print("qlora-tune: interrupted" if rv == 130 else f"qlora-tune: exit {rv}")
        sys.exit(rv)
    if argv is None:
        _exit_soon()


if __name__ == "__main__":
    main()
