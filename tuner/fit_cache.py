"""``resources_per_trial.gpu: auto``'s measured footprints, kept on disk: a study after the first on the
same model, settings and kind of card skips the fit (a process of its own, its imports and a short
training run per approach: about half a minute on an H200, the longest part of a study's start).

The key holds what a trial's memory depends on: the fit's run configs (without the data files; the fit
trains on synthetic texts), the label names, the model folder's config and files, the card's kind (Ray's
``accelerator_type`` resource), the versions of the libraries that allocate, and the trainer's own code.
A cluster whose card kind Ray does not know is never served from the cache."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from trainables.footprint import Footprint
from trainables.paths import home, write_text_atomic
from tuner.versions import installed

LIBRARIES = ("qlora-tune", "torch", "transformers", "peft", "bitsandbytes", "liger-kernel", "triton")
ENV = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def card_kinds(cluster: dict[str, float]) -> list[str]:
    """The cluster's GPU kinds as Ray names them (``accelerator_type:H200`` -> ``H200``)."""
    return sorted(k.split(":", 1)[1] for k in cluster if k.startswith("accelerator_type:"))


def fit_key(run_configs: list[dict], label_names: list[str], cluster: dict[str, float]) -> str | None:
    """The cache key of a fit of ``run_configs`` on ``cluster``'s cards; None where the card kind is
    unknown, or the cluster mixes kinds (the fit's card would be any of them)."""
    kinds = card_kinds(cluster)
    if len(kinds) != 1:
        return None
    what = {"configs": [{k: v for k, v in c.items() if k != "data"} for c in run_configs],
            "labels": list(label_names), "card": kinds[0], "models": sorted({_model_identity(c["model"]) for c in run_configs}),
            "versions": installed(LIBRARIES), "code": _code_digest(), "env": {k: os.environ.get(k) for k in ENV}}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def load(key: str) -> tuple[list[Footprint], str] | None:
    """The footprints kept under ``key`` and when they were measured; None when absent or unreadable."""
    try:
        d = json.loads(_path(key).read_text())
        return [Footprint(**f) for f in d["footprints"]], d["measured"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save(key: str, fps: list[Footprint]) -> None:
    """Keep ``fps`` under ``key`` (written whole, then renamed: a reader never sees half a file)."""
    write_text_atomic(_path(key), json.dumps({"footprints": [asdict(f) for f in fps],
                                              "measured": time.strftime("%Y-%m-%d %H:%M")}, indent=2))


def _path(key: str) -> Path:
    return home() / "fits" / f"{key}.json"


def _model_identity(ref: str) -> str:
    """A local model folder by its config and its files' names, sizes and times; a built-in or hub
    name by itself."""
    p = Path(ref).expanduser()
    if not (p / "config.json").is_file():
        return ref
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir() if f.is_file())
    return hashlib.sha256(json.dumps([(p / "config.json").read_text(), files]).encode()).hexdigest()


def _code_digest() -> str:
    """The trainer's source (``trainables``): a changed trainer may hold memory differently."""
    import trainables

    h = hashlib.sha256()
    root = Path(trainables.__file__).parent
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()
