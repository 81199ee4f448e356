"""The study file: a run config plus the search space, scheduler, resources, storage and tracking.

Search keys are dotted paths into the run config (``training.learning_rate``, ``lora.r``). Blocks
named after an approach (``head:``, ``generation:``) hold parameters searched only for trials of
that approach. Every key and every candidate value is checked against the run config up front.
"""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainables import params as P
from trainables.approaches import REGISTRY
from trainables.config import RunConfig, load_config, set_dotted
from trainables.errors import InputError

APPROACHES = tuple(REGISTRY)


class Distribution(BaseModel):
    """Exactly one of ``loguniform: [lo, hi]``, ``uniform: [lo, hi]``, ``int: [lo, hi]``, ``choice: [...]``."""

    model_config = ConfigDict(extra="forbid")
    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    int: tuple[builtins.int, builtins.int] | None = None  # the field's name hides the type here
    choice: list[Any] | None = None
    log: bool = False
    """With ``int``: sample on a log scale."""

    @model_validator(mode="after")
    def _one(self):
        kinds = [k for k in ("loguniform", "uniform", "int", "choice") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of loguniform, uniform, int, choice")
        kind = kinds[0]
        if kind == "choice":
            if not self.choice:
                raise ValueError("choice needs at least one value")
        else:
            lo, hi = getattr(self, kind)
            if lo >= hi:
                raise ValueError(f"{kind}: low {lo} must be below high {hi}")
            if kind == "loguniform" and lo <= 0:
                raise ValueError("loguniform: bounds must be positive")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("loguniform", "uniform", "int", "choice") if getattr(self, k) is not None)

    def candidates(self) -> list[Any]:
        """Values that must all be valid for the key: the bounds, or every choice."""
        return list(self.choice) if self.kind == "choice" else list(getattr(self, self.kind))

    def admits(self, value: Any) -> bool:
        """Whether ``value`` (as set in a config, or as Optuna holds a choice) lies in this distribution."""
        if self.kind == "choice":
            return P.encode(value) in [P.encode(c) for c in self.choice]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        lo, hi = getattr(self, self.kind)
        return lo <= value <= hi and (self.kind != "int" or float(value).is_integer())


class SchedulerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["asha", "none"] = "asha"
    max_epochs: int = Field(4, ge=1, le=1000)
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2, gt=1)

    @model_validator(mode="after")
    def _grace(self):
        if self.grace_period > self.max_epochs:
            raise ValueError(f"grace_period ({self.grace_period}) must not exceed max_epochs ({self.max_epochs})")
        return self


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cpu: float = Field(1, gt=0)
    gpu: Annotated[float, Field(ge=0)] | Literal["auto"] = "auto"
    """GPUs per trial; fractions pack several trials on one card. ``auto`` (the default): as many
    trials per card as fit, from a trial's memory measured at the search space's largest settings
    (:mod:`tuner.packing`); 0 on a cluster without GPUs. A fraction on a cluster without GPUs becomes 0
    with a warning; whole GPUs the cluster lacks fail before any trial starts. ``0`` keeps trials on
    the CPU."""
    workers: int = Field(1, ge=1)
    """Data-parallel Ray Train workers per trial (several GPUs per trial); each reserves ``cpu``
    CPUs and ``gpus_per_worker`` GPUs. ``training.batch_size`` stays the global batch."""
    gpus_per_worker: float = Field(0, ge=0)


class Tracking(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tracking_uri: str | None = None
    experiment: str = "qlora-tune"
    artifact_location: str | None = None
    """Artifact root of a newly created experiment (e.g. a shared path with a ``sqlite:`` store)."""


class StudyConfig(RunConfig):
    search: dict[str, Any] | None = None
    scheduler: SchedulerSettings = SchedulerSettings()
    metric: Literal["eval_f1_macro", "eval_accuracy", "eval_balanced_accuracy", "eval_loss"] = "eval_f1_macro"
    mode: Literal["max", "min"] | None = None
    num_trials: int = Field(8, ge=1, le=100_000)
    time_budget_s: float | None = Field(None, gt=0)
    """Stop starting trials and end the study after this many seconds (Ray Tune's time budget)."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    seed: int = 0
    resources_per_trial: Resources = Resources()
    storage: str | None = None
    """Where Ray keeps trial checkpoints: a local folder (default: the qlora-tune home), a shared
    path or ``s3://...`` on multi-node clusters."""
    keep_checkpoints: int = Field(1, ge=1)
    """Checkpoints Ray keeps per trial, the newest: each holds the resume state and the trial's best
    model so far, so one is enough."""
    reuse_actors: bool = True
    """Run trial after trial in the same Ray worker (single-worker trials; a data-parallel trial's
    actor never is), which keeps the tokenizer, the tokenized splits, a pristine quantized base per
    approach and the last trial's model with its adapters: no process start, imports, tokenizing or
    model load per trial (BENCHMARKS.md). The pristine bases cost memory besides a trial's own, which
    ``resources_per_trial.gpu: auto`` counts. ``false``: a fresh process for every trial."""
    max_failures: int = Field(2, ge=0)
    tracking: Tracking = Tracking()

    @model_validator(mode="after")
    def _mode(self):
        if self.mode is None:
            self.mode = "min" if self.metric == "eval_loss" else "max"
        return self

    def run_config(self, params: dict[str, Any] | None = None) -> RunConfig:
        """The run config of one trial: the fixed settings, ``params`` applied, epochs = max_epochs."""
        tree = self.model_dump(mode="json", include=set(RunConfig.model_fields))
        tree["training"]["epochs"] = self.scheduler.max_epochs
        for k, v in (params or {}).items():
            set_dotted(tree, k, v)
        return RunConfig.model_validate(tree)


class SearchSpace:
    """Validated search space: common parameters plus per-approach blocks."""

    def __init__(self, common: dict[str, Distribution], blocks: dict[str, dict[str, Distribution]]):
        self.common, self.blocks = common, blocks

    def approaches(self, fixed: str) -> list[str]:
        d = self.common.get("approach")
        return [str(a) for a in d.choice] if d else [fixed]

    def parameters(self, approach: str) -> list[tuple[str, str, Distribution]]:
        """(name Optuna samples it under, config key, distribution) of every parameter a trial of
        ``approach`` samples: the common ones (``approach`` first, where searched), then its block's."""
        return [(k, k, d) for k, d in self.common.items()] + \
               [(P.sampled_name(k, approach), k, d) for k, d in self.blocks.get(approach, {}).items()]

    def describe(self) -> dict:
        return {"common": {k: v.model_dump(exclude_none=True) for k, v in self.common.items()},
                **{a: {k: v.model_dump(exclude_none=True) for k, v in b.items()} for a, b in self.blocks.items()}}


DEFAULT_SEARCH = {
    # LoRA's usual learning rates (QLoRA's 2e-4 inside; below 1e-4 a short trial barely moves), batches
    # that keep a GPU fed, adapters on every linear layer (attention-only ones learn less per trial)
    "approach": {"choice": list(APPROACHES)},
    "training.learning_rate": {"loguniform": [1e-4, 1e-3]},  # at batch 32; scaled with the batch (tuner.defaults)
    "training.batch_size": {"choice": [16, 32, 64]},  # a 0.5-3B model's; smaller models get larger batches
    "training.warmup_ratio": {"uniform": [0.0, 0.1]},
    "training.weight_decay": {"choice": [0.0, 0.01, 0.1]},
    "lora.r": {"choice": [8, 16, 32]},
    "lora.alpha": {"choice": [16, 32, 64]},
    "lora.dropout": {"uniform": [0.0, 0.1]},
    **{name: dict(cls.default_search) for name, cls in REGISTRY.items() if cls.default_search},
}


def _leaf_exists(key: str) -> bool:
    cls: Any = RunConfig
    parts = key.split(".")
    for i, p in enumerate(parts):
        f = getattr(cls, "model_fields", {}).get(p)
        if f is None:
            return False
        ann = f.annotation
        if i < len(parts) - 1:
            if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                return False
            cls = ann
    return True


def parse_search(study: StudyConfig, source: str) -> SearchSpace:
    raw = DEFAULT_SEARCH if study.search is None else study.search
    if not raw:
        raise InputError(f"{source}: search: empty search space (remove the key for the default space)")
    common: dict[str, Distribution] = {}
    blocks: dict[str, dict[str, Distribution]] = {}

    def dist(key: str, spec: Any, where: str) -> Distribution:
        if not isinstance(spec, dict):
            raise InputError(f"{source}: {where}: expected a distribution such as {{choice: [...]}} or {{loguniform: [lo, hi]}}")
        try:
            return Distribution.model_validate(spec)
        except Exception as e:  # noqa: BLE001
            from pydantic import ValidationError

            msg = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
            if isinstance(e, ValidationError) and e.errors()[0]["type"] == "extra_forbidden":
                msg = f"unknown distribution '{e.errors()[0]['loc'][0]}' (use loguniform, uniform, int or choice)"
            raise InputError(f"{source}: {where}: {msg.removeprefix('Value error, ')}") from None

    for key, spec in raw.items():
        if key in APPROACHES:
            if not isinstance(spec, dict):
                raise InputError(f"{source}: search.{key}: expected a block of parameters for approach {key}")
            blocks[key] = {k: dist(k, v, f"search.{key}.{k}") for k, v in spec.items()}
        else:
            common[key] = dist(key, spec, f"search.{key}")
    approaches = common["approach"].choice if "approach" in common else [study.approach]
    if "approach" in common:
        if common["approach"].kind != "choice" or not set(map(str, approaches)) <= set(APPROACHES):
            raise InputError(f"{source}: search.approach: must be a choice among {list(APPROACHES)}")
    for a in blocks:
        if a not in approaches:
            raise InputError(f"{source}: search.{a}: block for an approach the study never runs (approaches: {approaches})")
    # keys must exist, sit in the right block, and every candidate value must validate
    for where, params in [("search", common)] + [(f"search.{a}", b) for a, b in blocks.items()]:
        for key, d in params.items():
            if not _leaf_exists(key):
                raise InputError(f"{source}: {where}.{key}: not a key of the run config")
            top = key.split(".")[0]
            if top in APPROACHES and where != f"search.{top}" and not (top == study.approach and "approach" not in common):
                raise InputError(f"{source}: {where}.{key}: only applies to approach {top}; put it under search.{top}")
            for value in d.candidates():
                probe = {key: value}
                if where.startswith("search.") and where != "search":
                    probe["approach"] = where.split(".")[1]
                try:
                    study.run_config(probe)
                except Exception as e:  # noqa: BLE001
                    from pydantic import ValidationError

                    msg = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
                    raise InputError(f"{source}: {where}.{key}: value {value!r} is invalid ({msg})") from None
    return SearchSpace(common, blocks)


def load_study(path: str | Path, overrides: list[str] | None = None) -> tuple[StudyConfig, SearchSpace]:
    study = load_config(path, overrides, StudyConfig)
    if study.storage and "://" not in study.storage:
        study.storage = str(Path(study.storage).expanduser().resolve())
    r = study.resources_per_trial
    if r.workers > 1 and "gpu" in r.model_fields_set and r.gpu:  # 'auto' too, where the file gives it
        raise InputError(f"{path}: resources_per_trial.gpu: with workers > 1 give GPUs per worker as "
                         f"gpus_per_worker (gpu is for single-worker trials)")
    if r.workers == 1 and r.gpus_per_worker:
        raise InputError(f"{path}: resources_per_trial.gpus_per_worker: only used with workers > 1; "
                         f"give a single-worker trial's GPUs as gpu")
    return study, parse_search(study, str(path))
