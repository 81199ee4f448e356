"""``qlora-tune predict --input big.parquet --output out.parquet --address auto``: batch prediction on a
Ray cluster. Ray Data streams the input through an actor pool of classifiers (one per GPU by default),
with its progress bar, and the driver writes the output rows in input order as they arrive."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from trainables.errors import InputError
from tuner.io import atomic_table_writer, check_output_path


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


class Predictor:
    """A Ray Data actor: one loaded classifier, labelling batches of rows (a pandas DataFrame)."""

    def __init__(self, files: dict[str, bytes], column: str, batch_size: int | None):
        from trainables.models import worker_device
        from trainables.predict import Classifier

        self.column = column
        self.clf = Classifier(_unpack(files), dev=worker_device(), batch_size=batch_size)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        texts = batch[self.column].tolist()
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"column '{self.column}' has an empty or non-text value: {t!r}")
        recs = pd.DataFrame(self.clf.predict(texts).records())
        return pd.concat([batch.reset_index(drop=True), recs], axis=1)


def _reason(e: BaseException) -> str:
    """The user-facing message inside Ray Data's wrapped error (our ValueError), else its first line."""
    import re

    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(str(e))
        e = getattr(e, "cause", None) or e.__cause__
    found = re.search(r"column '[^'{}]*' has an empty or non-text value: [^\n]{0,200}", "\n".join(chain))
    return found.group(0) if found else chain[0].strip().splitlines()[0][:300]


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


def predict_on_cluster(folder: Path, input: Path, output: Path, column: str, address: str,
                       batch_size: int | None, workers: int | None, gpus_per_worker: float,
                       timings: dict | None = None) -> int:
    """Label every row of ``input`` into ``output``; returns the number of rows. ``timings`` (if
    given) gets ``first_rows_s`` and ``total_s`` (when the first labelled rows and the last arrived)
    and ``first_rows`` (how many came first)."""
    import ray
    import ray.data

    from tuner.console import console
    from tuner.ray_cluster import connect

    check_output_path(output)
    connect(address)
    gpus = ray.cluster_resources().get("GPU", 0.0)
    if gpus_per_worker == 0 and gpus:
        gpus_per_worker = 0.5  # two actors per card: one tokenizes and collates while the other computes
    workers = workers or (max(1, int(gpus / gpus_per_worker)) if gpus_per_worker else 1)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # rows out in input order
    ds = _read(Path(input))
    columns = ds.columns()
    if column not in columns:
        raise InputError(f"{input}: no text column '{column}' (columns: {', '.join(columns[:20])}); pass --text-column")
    rows_per_task = 4 * (batch_size or 256)  # four forward passes per task (1,024 rows by default)
    # one input file reads as one block, and a block goes to one actor whole: split it as it streams,
    # so that every actor gets work and labelled rows flow out while the rest is computed
    ds = ds.repartition(target_num_rows_per_block=rows_per_task)
    labelled = ds.map_batches(Predictor, fn_constructor_kwargs={"files": _pack(Path(folder)), "column": column,
                                                                "batch_size": batch_size},
                              batch_size=rows_per_task, batch_format="pandas",
                              compute=ray.data.ActorPoolStrategy(size=workers), num_gpus=gpus_per_worker, num_cpus=1)
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
    console.print(f"wrote {rows} predictions to {output} ({workers} worker(s), {gpus_per_worker:g} GPU each)")
    return rows
