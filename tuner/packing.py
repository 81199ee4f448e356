"""``resources_per_trial.gpu: auto``: how many trials share a card, from a trial's measured GPU memory
at the largest settings of the search space (batch size, sequence length, LoRA rank, each approach)."""

from __future__ import annotations

import math
from typing import Callable

from trainables.errors import InputError
from tuner.console import console
from trainables.footprint import Footprint
from tuner.study_config import SearchSpace, StudyConfig

GiB = 2**30
CONTEXT_BYTES = 1 * GiB
"""Memory each trial process holds besides what its allocator reserves (the CUDA context, cuBLAS workspaces)."""
USABLE = 0.92
"""Share of a card that trials may fill together."""
MARGIN = 1.15
"""Growth allowed beyond the measured peak (fragmentation over a long run, longer real texts)."""
LARGEST = ("training.batch_size", "training.eval_batch_size", "training.max_length", "lora.r")


def largest_settings(study: StudyConfig, space: SearchSpace, approach: str) -> dict:
    """The study's run config with each of :data:`LARGEST` at its largest value in the space."""
    params = {}
    for key in LARGEST:
        d = space.common.get(key) or space.blocks.get(approach, {}).get(key)
        if d is not None:
            values = d.choice if d.kind == "choice" else list(getattr(d, d.kind))
            params[key] = max(values)
    params["approach"] = approach
    return study.run_config(params).dump()


def trials_per_card(peak_bytes: int, card_bytes: int, kept_bytes: int = 0) -> int:
    """Trials of ``peak_bytes`` (plus ``kept_bytes`` a reused worker keeps between trials) a card holds."""
    return math.floor(USABLE * card_bytes / (MARGIN * peak_bytes + kept_bytes + CONTEXT_BYTES))


def resolve_auto_gpu(study: StudyConfig, space: SearchSpace, source: str, label_names: list[str],
                     cluster: dict[str, float], refit: bool = False) -> StudyConfig:
    """The study with ``resources_per_trial.gpu: auto`` replaced by a share of a card (1/n for the n
    trials that fit), measured on one of the cluster's GPUs, or taken from the fit cache
    (:mod:`tuner.fit_cache`; ``refit``: measure again); no GPU: 0 (trials on the CPU). A space whose
    largest trial does not fit on a card fails here, naming the settings."""
    r = study.resources_per_trial
    if r.gpu != "auto" or r.workers > 1:  # data-parallel trials give their GPUs per worker
        return study
    if cluster.get("GPU", 0) == 0:
        if "gpu" in r.model_fields_set:  # asked for by name: say why it does nothing here
            console.print("[yellow]warning[/]: resources_per_trial.gpu: auto, but the cluster has no GPU; trials run on the CPU")
        gpu = 0.0
    else:
        cfgs = [largest_settings(study, space, a) for a in space.approaches(study.approach)]
        fps, note = footprints(cfgs, label_names, cluster, refit)
        fp, cfg = max(zip(fps, cfgs), key=lambda pair: pair[0].peak_bytes)
        gpu = share_of_card(fp, cfg, cluster, r.cpu, source, kept_bytes(study, fps), note)
    return study.model_copy(update={"resources_per_trial": r.model_copy(update={"gpu": gpu})})


def measure_on_cluster(cfgs: list[dict], label_names: list[str]) -> list[Footprint]:
    """Each run config's footprint, fitted on one of the cluster's GPUs in one process (its start and
    imports are most of the cost)."""
    import ray

    from trainables.footprint import measure_each

    return ray.get(ray.remote(num_gpus=1, num_cpus=1)(measure_each).remote(cfgs, label_names))


def footprints(cfgs: list[dict], label_names: list[str], cluster: dict[str, float], refit: bool = False,
               measure: Callable[[list[dict], list[str]], list[Footprint]] = measure_on_cluster,
               ) -> tuple[list[Footprint], str]:
    """Each run config's footprint, from the fit cache or by ``measure`` (then kept), and a note that
    says which."""
    from tuner import fit_cache

    key = fit_cache.fit_key(cfgs, label_names, cluster)
    kept = fit_cache.load(key) if key and not refit else None
    if kept is not None:
        fps, when = kept
        return fps, f" (measured {when}, kept in the fit cache; --refit measures again)"
    fps = measure(cfgs, label_names)
    if key:
        fit_cache.save(key, fps)
    return fps, ""


def kept_bytes(study: StudyConfig, fps: list[Footprint]) -> int:
    """Bytes a reused worker keeps besides the trial it runs: a pristine base per approach it can run
    (``fps``: one footprint per approach); none without ``reuse_actors``."""
    return len(fps) * max(f.base_bytes for f in fps) if study.reuse_actors and fps else 0


def share_of_card(fp: Footprint, cfg: dict, cluster: dict[str, float], cpus_per_trial: float, source: str,
                  kept_bytes: int = 0, note: str = "") -> float:
    """1/n of a card for the n trials of footprint ``fp`` (measured at run config ``cfg``) that fit on
    it, each worker also keeping ``kept_bytes`` (reused workers' pristine bases), and that the CPUs per
    card can run; an error naming the settings when not even one fits."""
    n = trials_per_card(fp.peak_bytes, fp.card_bytes, kept_bytes)
    t = cfg["training"]
    what = (f"a {cfg['approach']} trial at training.batch_size {t['batch_size']}, training.max_length "
            f"{t['max_length']} and lora.r {cfg['lora']['r']} (the space's largest) peaked at "
            f"{fp.peak_bytes / GiB:.1f} GiB")
    if kept_bytes:
        what += f" (and {kept_bytes / GiB:.2f} GiB of pristine bases a reused worker keeps)"
    if n < 1:
        raise InputError(f"{source}: resources_per_trial.gpu: auto: {what}, more than a "
                         f"{fp.card_bytes / GiB:.0f} GiB card holds; lower those in `search`, or give "
                         f"each trial several GPUs with resources_per_trial.workers"
                         + (", or set reuse_actors: false" if kept_bytes else ""))
    cpus_per_card = cluster.get("CPU", 1) / cluster["GPU"]
    n = max(1, min(n, math.floor(cpus_per_card / cpus_per_trial)))
    console.print(f"resources_per_trial.gpu: auto -> {1 / n:.4g} ({n} trial(s) per card): {what} of "
                  f"{fp.card_bytes / GiB:.0f} GiB{note}", soft_wrap=True)
    return 1.0 / n
