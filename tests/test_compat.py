"""Every private API qlora-tune relies on (trainables/compat.py), checked against the installed
versions: an upgrade that moves or changes one fails here, by name."""

from __future__ import annotations

import inspect

import pytest
import torch

from trainables import compat


def test_bitsandbytes_cpu_packing_switch_and_inverse_exist():
    """The attribute that keeps a 4-bit layer unpacked, and the private inverse that undoes packing."""
    import bitsandbytes.functional as BF
    from bitsandbytes.nn import Linear4bit

    layer = Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    assert hasattr(layer, "support_avx512bf16_for_cpu")
    layer.weight = type(layer.weight)(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")  # quantizes
    w = BF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    layer.weight.data, layer.weight.quant_state = BF._convert_weight_packed_for_cpu(layer.weight.data,
                                                                                  layer.weight.quant_state)
    assert compat.keep_4bit_out_of_cpu_packing(torch.nn.Sequential(layer)) == 1
    assert layer.support_avx512bf16_for_cpu is False
    assert not layer.weight.quant_state.packing_format_for_cpu
    back = BF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    # the inverse re-quantizes the block scales it had rounded to bf16: close, not bit-equal
    torch.testing.assert_close(back, w, rtol=2e-2, atol=2e-2 * float(w.abs().max()))


def test_ray_checkpoint_deletion_is_patched_to_skip_missing_paths(tmp_path):
    """Ray 2.60 keeps, in a resumed study, checkpoints deleted after its last snapshot; deleting one
    again must not kill the study."""
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal import checkpoint_manager as cm
    from ray.train._internal.checkpoint_manager import _CheckpointManager, _TrainingResult

    compat.tolerate_deleted_checkpoints()
    compat.tolerate_deleted_checkpoints()  # idempotent
    assert getattr(cm._delete_fs_path, "tolerates_missing", False)
    kept = tmp_path / "epoch2"
    kept.mkdir()
    (tmp_path / "epoch3").mkdir()
    manager = _CheckpointManager(CheckpointConfig(num_to_keep=1))
    for folder in (tmp_path / "gone-before-the-resume", kept, tmp_path / "epoch3"):
        manager.register_checkpoint(_TrainingResult(checkpoint=Checkpoint(str(folder)), metrics={}))
    assert not kept.exists() and (tmp_path / "epoch3").exists()  # deleting still works


def test_tunes_sigint_handler_has_the_name_compat_checks():
    import ray.tune.tune as tune_module

    assert f"def {compat._TUNE_SIGINT_HANDLER}(" in inspect.getsource(tune_module)

    def signal_interrupt_tune_run(sig, frame):  # what Tune installs during fit()
        pass

    assert not compat.tune_was_interrupted(signal_interrupt_tune_run)
    assert compat.tune_was_interrupted(lambda sig, frame: None)


def test_ray_init_takes_the_loopback_node_address():
    import ray

    source = inspect.getsource(ray.init)  # Ray takes its private arguments from **kwargs
    for name in compat.loopback_node_kwargs():
        assert f'kwargs.pop("{name}"' in source, name


def test_local_gpu_count_is_what_ray_gives_a_local_cluster(monkeypatch):
    """The count a local cluster would get from Ray, on this machine and on a 4-GPU node (NVML's answer
    patched in), whatever ``CUDA_VISIBLE_DEVICES`` hides."""
    from ray._private.accelerators import get_accelerator_manager_for_resource
    from ray._private.resource_and_label_spec import ResourceAndLabelSpec

    def ray_count() -> int:
        return ResourceAndLabelSpec().resolve(is_head=True).num_gpus

    assert compat.local_gpu_count() == ray_count()  # none on the CPU test machine
    manager = get_accelerator_manager_for_resource("GPU")
    monkeypatch.setattr(manager, "get_current_node_num_accelerators", staticmethod(lambda: 4))
    for visible, want in ((None, 4), ("0,2", 2), ("", 0)):
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert compat.local_gpu_count() == ray_count() == want, visible


def test_optuna_search_trials_can_be_told_pruned():
    import optuna
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    def space(trial):
        trial.suggest_float("x", 0.0, 1.0)

    search = OptunaSearch(space=space, metric="m", mode="max", sampler=optuna.samplers.RandomSampler(seed=0))
    assert search.suggest("t1") is not None
    assert compat.tell_optuna_pruned(search, "t1")
    assert not compat.tell_optuna_pruned(search, "unknown")
    assert [t.state for t in search._ot_study.trials] == [TrialState.PRUNED]


def test_ray_token_auth_helper_exists_and_respects_an_explicit_mode(monkeypatch):
    from ray._private.authentication.authentication_token_setup import (  # noqa: F401 - must exist
        maybe_enable_token_auth_if_token_available,
    )

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert compat.enable_ray_token_auth_if_available() is True
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert compat.enable_ray_token_auth_if_available() is False


def test_a_failed_captures_generator_release_uses_torchs_public_generator_methods():
    """What it does is checked on a GPU (benchmarks/check_gpu_paths.py: dropout after a capture that
    failed); here, that its methods exist and that without CUDA there is nothing to release."""
    import torch

    assert compat.release_generator_from_capture() is torch.cuda.is_available()
    assert callable(torch.Generator.clone_state) and callable(torch.Generator.graphsafe_set_state)


def test_every_compat_helper_is_tested_here():
    """A helper added to compat without a test here fails this test."""
    helpers = [n for n, f in inspect.getmembers(compat, inspect.isfunction)
               if f.__module__ == compat.__name__ and not n.startswith("_")]
    assert len(helpers) >= 6, helpers
    tests = inspect.getsource(inspect.getmodule(test_every_compat_helper_is_tested_here)).split(
        "def test_every_compat_helper_is_tested_here")[0]
    assert [n for n in helpers if f"compat.{n}(" not in tests] == []
