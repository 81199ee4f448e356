"""A study's Ray storage (a folder or ``s3://...``): bytes per trial, and dropping the checkpoints of
trials that no longer need them. Reads and deletes through pyarrow's filesystems, as Ray does."""

from __future__ import annotations

from pathlib import Path


def _fs(location: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(location) if "://" in location else (pafs.LocalFileSystem(), location)


def tree_bytes(fs, path: str) -> int:
    """Bytes of the files under ``path``."""
    import pyarrow.fs as pafs

    return sum(i.size or 0 for i in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
               if i.type == pafs.FileType.File)


def bytes_by_trial(experiment_path: str) -> dict[str, int]:
    """Bytes under each trial's folder of a study's storage (Tune names them after the trial id)."""
    import pyarrow.fs as pafs

    fs, path = _fs(experiment_path)
    return {i.base_name: tree_bytes(fs, i.path)
            for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
            if i.type == pafs.FileType.Directory and not i.base_name.startswith(("_", "."))}


def checkpoint_dirs(fs, trial_path: str) -> list[str]:
    import pyarrow.fs as pafs

    return [i.path for i in fs.get_file_info(pafs.FileSelector(trial_path, allow_not_found=True))
            if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")]


def drop_checkpoints(trial) -> int:
    """Delete every checkpoint of a Tune ``trial``; returns the bytes freed. For a trial whose best
    adapter is in MLflow and that nothing resumes (stopped early): most trials of an ASHA study."""
    fs = trial.checkpoint.filesystem
    freed = 0
    for path in checkpoint_dirs(fs, trial.path):
        freed += tree_bytes(fs, path)
        fs.delete_dir(path)
    return freed


def latest_model(experiment_path: str, trial_id: str, dest: Path) -> Path | None:
    """The model folder (best epoch so far) of a trial's newest checkpoint, copied to ``dest``; None
    when the trial wrote no checkpoint."""
    import pyarrow.fs as pafs

    fs, path = _fs(experiment_path)
    trial_dirs = [i.path for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
                  if i.type == pafs.FileType.Directory and trial_id in i.base_name]
    ckpts = sorted(c for t in trial_dirs for c in checkpoint_dirs(fs, t))
    for ckpt in reversed(ckpts):
        model = f"{ckpt}/model"
        if fs.get_file_info(model).type == pafs.FileType.Directory:
            pafs.copy_files(model, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            return dest
    return None
