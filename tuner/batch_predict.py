"""``qlora-tune predict --input big.parquet --output out.parquet --address auto``: batch prediction on a
Ray cluster. Ray Data streams the input through an actor pool of classifiers (two per GPU by default),
with its progress bar, and the driver writes the output rows in input order as they arrive.

With ``--via-serve`` the pool is the replicas of a running ``qlora-tune serve`` application instead:
Ray Data's actors only pass batches to them, so a job starts without loading a model or importing torch
(the 20-25 s that dominate a cold job of 100,000 texts on an H200, BENCHMARKS.md)."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from trainables.errors import InputError  # (no torch at import: ServedPredictor's workers never load it)


def _pack(folder: Path) -> dict[str, bytes]:
    """A model folder as {relative path: bytes}: it travels through Ray's object store to every node."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _unpack(files: dict[str, bytes]) -> Path:
    """The packed folder on this node, written once per content (:func:`trainables.paths.cached_folder`)."""
    import hashlib

    from trainables.paths import cached_folder, downloads_dir

    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).digest())

    def write(root: Path) -> None:
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)

    return cached_folder(downloads_dir() / f"packed-{h.hexdigest()[:20]}", write)


def _texts(batch: pd.DataFrame, column: str) -> list[str]:
    texts = batch[column].tolist()
    for t in texts:
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"column '{column}' has an empty or non-text value: {t!r}")
    return texts


def _labelled(batch: pd.DataFrame, records: list[dict]) -> pd.DataFrame:
    """The input rows with ``label`` and ``p_<label>`` columns (the records format of every predictor)."""
    return pd.concat([batch.reset_index(drop=True), pd.DataFrame(records)], axis=1)


class Predictor:
    """A Ray Data actor: one loaded classifier, labelling batches of rows (a pandas DataFrame)."""

    def __init__(self, files: dict[str, bytes], column: str, batch_size: int | None):
        from trainables.models import worker_device
        from trainables.predict import Classifier

        self.column = column
        self.clf = Classifier(_unpack(files), dev=worker_device(), batch_size=batch_size)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return _labelled(batch, self.clf.predict(_texts(batch, self.column)).records())


class ServedPredictor:
    """A Ray Data actor that hands batches to the replicas of a running ``qlora-tune serve``
    application (their dynamic batcher, mixed with any live traffic) and waits for the labels."""

    def __init__(self, app: str, version: str, column: str):
        from ray import serve

        self.handle, self.version, self.column = serve.get_app_handle(app), version, column

    async def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        # async: a handle needs an event loop where Serve's throughput mode runs routers on the caller's
        # loop (as `qlora-tune serve` sets it), and Ray Data then keeps several batches in flight per actor
        preds = (await self.handle.predict.remote(_texts(batch, self.column), self.version))["predictions"]
        return _labelled(batch, [{k: v for k, v in p.items() if k != "model"} for p in preds])


def served_version(app: str, ref: str) -> tuple[str, int]:
    """The name under which the running Serve application ``app`` serves model reference ``ref``, and
    its running replicas; a one-line error where it is not running or serves other models."""
    import logging

    from ray import serve

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines about routers, on stderr
    try:
        handle = serve.get_app_handle(app)
        served = handle.served.remote().result(timeout_s=60)
        replicas = serve.status().applications[app].deployments["classifier"].replica_states.get("RUNNING", 0)
    except Exception as e:  # noqa: BLE001 - not deployed, still starting, or another kind of app
        raise InputError(f"--via-serve: no running `qlora-tune serve` on this cluster "
                         f"({str(e).strip().splitlines()[0][:200]}); start one with `qlora-tune serve {ref} "
                         f"--address ...`") from None
    for name, served_ref in served.items():
        if served_ref == ref:
            return name, max(1, replicas)
    raise InputError(f"--via-serve: the running server serves {', '.join(sorted(served.values()))}, not {ref}")


def _reason(e: BaseException) -> str:
    """The user-facing message inside Ray Data's wrapped error (our ValueError), else its first line."""
    import re

    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(str(e))
        e = getattr(e, "cause", None) or e.__cause__
    found = re.search(r"column '[^'{}]*' has an empty or non-text value: [^\n]{0,200}", "\n".join(chain))
    if found:
        return found.group(0)
    # the root cause: the exception line of the innermost error (Ray wraps it with its own hints)
    text = "\n".join(chain)
    causes = re.findall(r"^(?:[\w.]+(?:Error|Exception)): [^\n]{1,300}", text, re.M)
    return causes[0] if causes else chain[0].strip().splitlines()[0][:300]


def _read(path: Path):
    import ray.data

    suffix = path.suffix.lower()
    if not path.exists():
        raise InputError(f"{path}: input file not found")
    if suffix == ".parquet":
        return ray.data.read_parquet(str(path))
    if suffix in (".csv", ".tsv"):
        import pyarrow.csv as pacsv

        return ray.data.read_csv(str(path), parse_options=pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".jsonl":
        return ray.data.read_json(str(path), lines=True)
    raise InputError(f"{path}: input must end in .csv, .tsv, .jsonl or .parquet")


def predict_on_cluster(model: str | Path, input: Path, output: Path, column: str, address: str,
                       batch_size: int | None, workers: int | None, gpus_per_worker: float,
                       timings: dict | None = None, via_serve: bool = False) -> int:
    """Label every row of ``input`` into ``output``; returns the number of rows. ``model`` is a model
    folder, or with ``via_serve`` the reference that the running server was started with. ``timings``
    (if given) gets ``first_rows_s`` and ``total_s`` (when the first labelled rows and the last arrived)
    and ``first_rows`` (how many came first)."""
    import ray
    import ray.data

    from tuner.console import console
    from tuner.io import atomic_table_writer, check_output_path
    from tuner.ray_cluster import connect

    check_output_path(output)
    connect(address)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # rows out in input order
    ds = _read(Path(input))
    columns = ds.columns()
    if column not in columns:
        raise InputError(f"{input}: no text column '{column}' (columns: {', '.join(columns[:20])}); pass --text-column")
    rows_per_task = 4 * (batch_size or 256)  # four forward passes per task (1,024 rows by default)
    # one input file reads as one block, and a block goes to one actor whole: split it as it streams,
    # so that every actor gets work and labelled rows flow out while the rest is computed
    ds = ds.repartition(target_num_rows_per_block=rows_per_task)
    if via_serve:  # actors that wait on the replicas: no GPU, no CPU reservation
        from tuner.serve import APP_NAME

        version, replicas = served_version(APP_NAME, str(model))
        workers = workers or 2 * replicas  # each replica has the next batch queued while it computes one
        where = f"{workers} worker(s) feeding {replicas} Serve replica(s) of '{version}'"
        actor, kwargs, resources = ServedPredictor, {"app": APP_NAME, "version": version, "column": column}, {"num_cpus": 0}
    else:
        gpus = ray.cluster_resources().get("GPU", 0.0)
        if gpus_per_worker == 0 and gpus:
            gpus_per_worker = 0.5  # two actors per card: one tokenizes and collates while the other computes
        workers = workers or (max(1, int(gpus / gpus_per_worker)) if gpus_per_worker else 1)
        where = f"{workers} worker(s), {gpus_per_worker:g} GPU each"
        actor, kwargs = Predictor, {"files": _pack(Path(model)), "column": column, "batch_size": batch_size}
        resources = {"num_cpus": 1, "num_gpus": gpus_per_worker}
    labelled = ds.map_batches(actor, fn_constructor_kwargs=kwargs, batch_size=rows_per_task, batch_format="pandas",
                              compute=ray.data.ActorPoolStrategy(size=workers), **resources)
    rows, t0 = 0, time.perf_counter()
    try:
        with atomic_table_writer(output) as write:
            for batch in labelled.iter_batches(batch_size=None, batch_format="pyarrow"):
                if not rows and timings is not None:
                    timings.update(first_rows_s=round(time.perf_counter() - t0, 2), first_rows=batch.num_rows)
                write(batch.replace_schema_metadata(None).to_pandas())  # plain NumPy dtypes
                rows += batch.num_rows
    except ray.exceptions.RayTaskError as e:
        raise InputError(f"{input}: {_reason(e)}") from None
    if timings is not None:
        timings["total_s"] = round(time.perf_counter() - t0, 2)
    console.print(f"wrote {rows} predictions to {output} ({where})")
    return rows
