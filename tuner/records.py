"""Where a study is found again: its record (``<home>/studies/<name>/study.json``)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from trainables.errors import InputError
from trainables.paths import home, write_text_atomic
from tuner.study_config import StudyConfig

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclasses.dataclass
class StudyRecord:
    """What ``resume``/``status``/``promote`` need to find a study again (``study.json``)."""

    name: str
    source: str
    config: dict
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    storage_path: str
    created: str
    data_fingerprint: str = ""
    state: str = "running"
    start_phases: dict[str, float] = dataclasses.field(default_factory=dict)
    """Seconds of each step the driver took before Ray Tune started the trials: ``load`` (config,
    data, tracking server), ``ray`` (start or connect), ``gpu_auto`` (``gpu: auto``'s fit),
    ``tracking`` (experiment, parent run, logged config)."""
    trials_started: float = 0.0
    """When Ray Tune was asked to start the trials (seconds since the epoch; 0: not yet)."""
    trials_returned: float = 0.0
    """When Ray Tune returned from the trials, before the study's report (0: not yet)."""

    @staticmethod
    def folder(name: str) -> Path:
        return home() / "studies" / name

    def save(self) -> None:
        write_text_atomic(self.folder(self.name) / "study.json", json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, name: str) -> "StudyRecord":
        f = cls.folder(name) / "study.json"
        if not f.is_file():
            known = sorted(p.name for p in (home() / "studies").glob("*") if (p / "study.json").is_file()) \
                if (home() / "studies").is_dir() else []
            hint = f" (known: {', '.join(known[-10:])})" if known else " (no studies yet)"
            raise InputError(f"study '{name}': not found{hint}")
        return cls(**json.loads(f.read_text()))

    @property
    def study(self) -> StudyConfig:
        return StudyConfig.model_validate(self.config)

    @property
    def experiment_path(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"


def latest_study() -> str:
    root = home() / "studies"
    recs = sorted(root.glob("*/study.json"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not recs:
        raise InputError("no studies yet: start one with `qlora-tune run STUDY.yaml`")
    return recs[-1].parent.name




def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InputError(f"--name {name!r}: use letters, digits, '-', '_' and '.' (at most 100)")
    return name
