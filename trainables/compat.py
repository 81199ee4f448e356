"""Every use of a library's private or undocumented API, in one place, each with the reason.

``tests/test_compat.py`` exercises each of them against the installed versions, so an upgrade that
moves or changes one fails there, by name, rather than somewhere deep in a study.
"""

from __future__ import annotations

# ------------------------------------------------------------------ bitsandbytes: CPU packing format
#
# bitsandbytes >= 0.50 converts an NF4 ``Linear4bit`` on a CPU with AVX512-BF16 into a "packing
# format" the first time the layer runs in eval mode (``Linear4bit.forward``). From then on its
# forward goes through ``gemv_4bit``, which (a) has no autograd kernel, so no gradient reaches the
# layer's input when training goes on after an evaluation, and (b) computes with bf16 block scales, so
# its outputs drift by ~1e-3 from the NF4 weights and vary with the batch shape. qlora-tune keeps every
# 4-bit layer out of that format: training, evaluation and prediction all run the same dequantizing
# path, on every CPU. The switch is the public attribute ``support_avx512bf16_for_cpu`` that
# ``Linear4bit.__init__`` sets; undoing a conversion needs bitsandbytes' private inverse.


def keep_4bit_out_of_cpu_packing(model) -> int:
    """Turn the CPU packing format off for every 4-bit layer of ``model`` and undo it where it was
    already applied. Returns how many layers had to be unpacked (0 on GPUs and older bitsandbytes)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return 0
    unpacked = 0
    for m in model.modules():
        if not isinstance(m, Linear4bit):
            continue
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
        state = getattr(m.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu_inverse(m.weight.data, state)
            unpacked += 1
    return unpacked


# ------------------------------------------------------------------ Ray Tune: resuming a study
#
# Ray 2.60 (the locked version; pyproject admits >= 2.50), resuming a study: Tune restores each trial's
# list of kept checkpoints from its last snapshot of the experiment, so a driver killed between deleting
# an old checkpoint and the next snapshot leaves that checkpoint in the restored list. The next
# checkpoint the trial reports makes Tune delete it again, and ``_delete_fs_path`` raises
# ``FileNotFoundError`` for a missing path from outside its own ``try``: the resumed study dies. The
# patch only skips paths that are already gone, so it is harmless where Ray has fixed this.


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


# ------------------------------------------------------------------ Ray Tune: was the study interrupted?
#
# ``Tuner.fit()`` catches Ctrl-C itself and returns normally. Its SIGINT handler puts the previous
# handler back only when it fired, so after ``fit()`` a SIGINT handler that is no longer Tune's own
# (named below) means the study was interrupted. Ray has no public flag for this.

_TUNE_SIGINT_HANDLER = "signal_interrupt_tune_run"


def tune_was_interrupted(handler_after_fit) -> bool:
    """Whether Tune's SIGINT handler fired during ``fit()`` (given the handler installed after it)."""
    import os

    if int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0")):
        return False
    return getattr(handler_after_fit, "__name__", "") != _TUNE_SIGINT_HANDLER


# ------------------------------------------------------------------ Ray: token authentication
#
# ``ray.init`` turns token authentication on by itself only for a local cluster it finds, never for an
# explicit address. Setting the documented ``RAY_AUTH_MODE=token`` from inside the process is not
# enough either: Ray has cached its configuration by then (measured: "Failed to connect"). Ray's own
# helper sets the mode and refreshes that cache, as `ray start` does.


def enable_ray_token_auth_if_available() -> bool:
    """Use this machine's Ray token (``$RAY_AUTH_TOKEN``, ``~/.ray/auth_token``) to join a cluster;
    True if token authentication is on. An explicit ``RAY_AUTH_MODE`` is respected."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return False
    return bool(maybe_enable_token_auth_if_token_available(warn_if_disabled=False))


# ------------------------------------------------------------------ Ray: joining a loopback cluster


def loopback_node_kwargs() -> dict:
    """``ray.init`` arguments that join a cluster bound to 127.0.0.1 as a loopback node (Ray's
    ``_node_ip_address``: otherwise the driver registers under the machine's outward address)."""
    return {"_node_ip_address": "127.0.0.1"}


# ------------------------------------------------------------------ Ray: this machine's GPUs before Ray starts
#
# A study on a cluster of its own checks its resources before Ray starts. Ray counts a node's GPUs
# with its accelerator manager (NVML, then ``CUDA_VISIBLE_DEVICES``); asking it gives the count the
# local cluster will have, without importing torch (seconds of the study's start).


def local_gpu_count() -> int:
    """GPUs a local Ray cluster started by this process would have (0 without an NVIDIA driver)."""
    from ray._private.accelerators import get_accelerator_manager_for_resource

    manager = get_accelerator_manager_for_resource("GPU")
    count = manager.get_current_node_num_accelerators()
    visible = manager.get_current_process_visible_accelerator_ids()
    return count if visible is None else min(count, len(visible))


# ------------------------------------------------------------------ Optuna through Ray's OptunaSearch
#
# Ray's ``OptunaSearch`` tells Optuna every trial that ends as COMPLETE; telling one as PRUNED needs
# the Optuna trial it keeps per Tune trial (``_ot_trials``) and its study (``_ot_study``).


def tell_optuna_pruned(searcher, trial_id: str) -> bool:
    """Tell Optuna that Tune trial ``trial_id`` was pruned; False if the searcher does not know it."""
    from optuna.trial import TrialState

    ot_trial = searcher._ot_trials.get(trial_id)
    if ot_trial is None:
        return False
    searcher._ot_study.tell(ot_trial, None, state=TrialState.PRUNED)
    return True


# ------------------------------------------------------------------ torch: a CUDA graph capture that fails
#
# ``torch.cuda.graph`` puts the current device's default CUDA generator into capture mode when a capture
# begins, and takes it out in ``capture_end`` after ``cudaStreamEndCapture``. When that call fails (the
# capture was invalidated), the generator stays in capture mode, and every later random op outside a
# capture (dropout) raises "Offset increment outside graph capture encountered unexpectedly": a run
# that meant to go on eagerly cannot. A clone of the generator's state has its seed and offset but
# not that mode (``CUDAGeneratorState::clone``); the public ``Generator.graphsafe_set_state`` installs it.


def release_generator_from_capture() -> bool:
    """Take the current CUDA device's default generator out of a capture that ended in an error,
    keeping its seed and offset. Returns whether there was a CUDA generator to release."""
    import torch

    if not torch.cuda.is_available():
        return False
    gen = torch.cuda.default_generators[torch.cuda.current_device()]
    gen.graphsafe_set_state(gen.clone_state())
    return True
