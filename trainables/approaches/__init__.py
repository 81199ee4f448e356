"""The ways to fine-tune a classifier, one module each, found by name.

Every module of this package defines one :class:`~trainables.approaches.base.Approach` subclass: its
settings (a block of the run config named after it), how its base model is loaded, its loss and its
scoring. The registry is built from the modules present, so adding an approach means adding a module;
the config, the search space, the loop and the predictor take it from here.
"""

from __future__ import annotations

import importlib
import pkgutil

from trainables.approaches.base import (
    Approach,
    Example,
    autocast,
    batched_log_scores,
    decision_loss,
    to_device,
    use_bf16,
)

__all__ = ["REGISTRY", "Approach", "Example", "approach_class", "autocast", "batched_log_scores",
           "decision_loss", "make_approach", "to_device", "use_bf16"]


def _discover() -> dict[str, type[Approach]]:
    found: dict[str, type[Approach]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Approach) and obj.__module__ == module.__name__:
                if obj.name in found:
                    raise RuntimeError(f"approach '{obj.name}' is defined twice ({found[obj.name].__module__}, {module.__name__})")
                found[obj.name] = obj
    return dict(sorted(found.items(), key=lambda kv: (kv[1].rank, kv[0])))


REGISTRY: dict[str, type[Approach]] = _discover()
"""Approach classes by name, the default approach first."""


def approach_class(name: str) -> type[Approach]:
    return REGISTRY[name]


def make_approach(tokenizer, label_names: list[str], cfg) -> Approach:
    return REGISTRY[cfg.approach](tokenizer, label_names, cfg)
