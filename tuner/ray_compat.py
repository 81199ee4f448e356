"""Work-arounds for bugs of the pinned Ray, each applied in the driver before a study runs.

Ray 2.60, resuming a study: Tune restores each trial's list of kept checkpoints from its last
snapshot of the experiment (taken about every 10 s), so a driver killed between deleting an old
checkpoint and the next snapshot leaves that checkpoint in the restored list. The next checkpoint
the trial reports makes Tune delete it again, and ``_delete_fs_path`` raises ``FileNotFoundError``
for a missing path from outside its own ``try`` (``_is_directory``): the resumed study dies.
"""

from __future__ import annotations


def tolerate_deleted_checkpoints() -> None:
    """Make Tune's checkpoint manager skip checkpoints that are already gone (idempotent)."""
    import pyarrow.fs as pafs
    from ray.train._internal import checkpoint_manager as cm

    original = cm._delete_fs_path
    if getattr(original, "tolerates_missing", False):
        return

    def delete(fs, fs_path: str) -> None:
        if fs.get_file_info(fs_path).type != pafs.FileType.NotFound:
            original(fs=fs, fs_path=fs_path)

    delete.tolerates_missing = True
    cm._delete_fs_path = delete
