"""Real training of a tiny random Llama with NF4 on the CPU: both approaches, output, round-trip."""

from __future__ import annotations

import json
import time

import numpy as np
import torch
import pytest

from tests.conftest import tiny_config
from trainables.config import RunConfig
from trainables.data import load_dataset
from trainables.loop import Trainer
from trainables.predict import Classifier


def _trainer(tiny_csv, **over):
    cfg = RunConfig.model_validate(tiny_config(tiny_csv, **over))
    return Trainer(cfg, load_dataset(cfg.data), log=lambda *_: None)


@pytest.mark.parametrize("approach", ["head", "generation"])
def test_train_nf4_writes_output_and_predict_round_trips(tiny_csv, tmp_path, approach):
    tr = _trainer(tiny_csv, approach=approach)
    from bitsandbytes.nn import Linear4bit

    assert any(isinstance(m, Linear4bit) for m in tr.model.modules()), "base must be NF4-quantized"
    res = tr.fit()
    assert len(res.history) == 1 and {"train_loss", "eval_accuracy", "eval_f1_macro"} <= set(res.history[0])
    out = tr.save_output(tmp_path / "out", res)
    for f in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "tokenizer/tokenizer.json",
              "labels.json", "config.yaml", "metrics.json", "run_info.json",
              *(f"plots/confusion_{s}.{e}" for s in ("train", "eval", "test") for e in ("json", "png"))):
        assert (out / f).is_file(), f
    assert not list(out.glob("**/*.bin")) and not list(out.glob("**/*.pt")), "safetensors only"
    metrics = json.loads((out / "metrics.json").read_text())
    cm = np.array(metrics["final"]["test"]["confusion_matrix"])
    assert cm.sum() == len(tr.data.test)
    expected, _ = tr.evaluate("test")
    clf = Classifier(out)
    got = clf.predict(tr.data.test.texts)
    # Same weights, same dequantizing fp32 path: only the batch shapes differ (predict batches 64,
    # evaluate 32), so rounding differences are a few fp32 ulps per layer (~1e-6 seen); 1e-5 leaves room
    # for that and catches a different kernel (bitsandbytes' CPU packing format drifted by 4e-4).
    np.testing.assert_allclose(got.probabilities, expected, atol=1e-5)
    assert set(got.labels) <= set(tr.data.label_names)
    np.testing.assert_allclose(got.probabilities.sum(1), 1.0, atol=1e-5)


@pytest.mark.parametrize("select", ["best", "last"])
def test_the_final_report_takes_the_selected_epochs_eval_report(tiny_csv, select):
    """finish() evaluates every split with the selected epoch's adapter; the eval split's report of
    that epoch was made as the epoch ended, with the same weights: it is taken, not made again."""
    tr = _trainer(tiny_csv, quantization="none", **{"training.epochs": 3, "training.learning_rate": 5e-3,
                                                    "training.select": select})
    tr._score_value = lambda m: -m["epoch"]  # epoch 1 scores best: "best" restores it, "last" keeps epoch 3
    evaluated = []
    inner = tr.evaluate
    tr.evaluate = lambda split: (evaluated.append(split), inner(split))[1]
    res = tr.fit()
    assert evaluated.count("eval") == 3 and evaluated.count("train") == 1, evaluated  # one per epoch; none in finish
    assert res.best_epoch == (1 if select == "best" else 3) and tr.best.epoch == 1
    again = inner("eval")[1]  # the selected adapter, evaluated now
    assert res.final["eval"]["confusion_matrix"] == again["confusion_matrix"]
    assert res.final["eval"]["loss"] == pytest.approx(again["loss"], rel=1e-5)
    other = res.history[2 if select == "best" else 0]["eval_loss"]  # the epoch not selected scored otherwise
    assert res.final["eval"]["loss"] != pytest.approx(other, rel=1e-5)


@pytest.mark.parametrize("approach", ["head", "generation"])
def test_lora_inputs_stay_bf16_under_autocast_with_the_same_loss_and_gradients(tiny_csv, approach):
    """Under bf16 autocast, peft's plain LoRA layers (an unquantized or dequantized base) would cast
    each input to float32 before the bf16 matmul; the trainer turns that off. Same loss, same gradients."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    tr = _trainer(tiny_csv, approach=approach, quantization="none", **{"training.bf16": True, "training.fused_lora": False})
    layers = [m for m in tr.model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and not any(m.cast_input_dtype_enabled for m in layers)
    assert all(m.cast_input_dtype_enabled for m in _trainer(tiny_csv, quantization="none").model.modules()
               if isinstance(m, BaseTunerLayer))  # float32 throughout: nothing to change
    tr.model.eval()  # no dropout: the two passes must agree
    batch = tr.approach.collate(tr.train_examples[:4], train=True)
    results = []
    for cast in (False, True):
        for m in layers:
            m.cast_input_dtype_enabled = cast
        tr.model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = tr.approach.loss(tr.model, batch, None)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in tr.trainable]))
    (a, ga), (b, gb) = results
    assert a == pytest.approx(b, rel=1e-6) and a > 0
    assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-7) for x, y in zip(ga, gb))


def test_versions_on_one_base_keep_lora_input_casts_unless_all_run_under_autocast(tiny_csv, tmp_path):
    """A served base holds every version's adapter in the same LoRA layers, so their input cast is one
    switch: it goes off only where every version on that base runs under autocast (a version without
    autocast feeds its adapters inputs of the base's dtype, which peft casts to theirs)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from trainables.predict import ClassifierSet

    folders = {}
    for name, bf16 in (("auto", True), ("plain", False), ("auto2", True)):
        tr = _trainer(tiny_csv, quantization="none", **{"training.bf16": bf16})
        folders[name] = tr.save_output(tmp_path / name, tr.fit())
    texts = tr.data.test.texts
    mixed = ClassifierSet({k: folders[k] for k in ("auto", "plain")}, merge=False)
    model = mixed.models[mixed.versions["plain"].base_key]
    assert all(m.cast_input_dtype_enabled for m in model.modules() if isinstance(m, BaseTunerLayer))
    for name in ("auto", "plain"):
        assert len(mixed.predict(texts, name).labels) == len(texts)
    alike = ClassifierSet({k: folders[k] for k in ("auto", "auto2")}, merge=False)
    model = alike.models[alike.versions["auto"].base_key]
    assert not any(m.cast_input_dtype_enabled for m in model.modules() if isinstance(m, BaseTunerLayer))
    np.testing.assert_allclose(alike.predict(texts, "auto").probabilities,
                               mixed.predict(texts, "auto").probabilities, atol=1e-6)


def test_head_loss_goes_down_on_a_learnable_toy(tiny_csv):
    tr = _trainer(tiny_csv, quantization="none", **{"training.epochs": 8, "training.learning_rate": 1e-2})
    res = tr.fit()
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < 0.5 * losses[0], losses
    assert res.final["train"]["accuracy"] >= 0.9, res.final["train"]


def test_generation_loss_only_on_label_tokens(tiny_csv):
    tr = _trainer(tiny_csv, approach="generation")
    ex = tr.train_examples[0]
    batch = tr.approach.collate([ex], train=True)
    label_tokens = tr.approach.label_ids[ex.label]
    assert batch["target_ids"].tolist() == label_tokens
    # each label token is predicted from the position before it
    length = batch["input_ids"].shape[1] - 1
    assert batch["target_pos"].tolist() == [p - 1 for p in range(ex.prompt_len, len(ex.input_ids))]
    flat = batch["input_ids"][:, 1:].reshape(-1)
    assert flat[batch["target_pos"]].tolist() == label_tokens and length >= len(ex.input_ids) - 1
    assert batch["input_ids"].shape[1] % tr.cfg.training.pad_to_multiple_of == 0


def test_generation_full_scoring_gives_a_distribution_over_labels(tiny_csv):
    tr = _trainer(tiny_csv, approach="generation", **{"generation.scoring": "full"})
    assert not tr.approach.first_token
    probs, rep = tr.evaluate("eval")
    assert probs.shape == (len(tr.data.eval), 2)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    # byte-level labels " pos"/" neg" share their first token: auto must fall back to full scoring
    auto = _trainer(tiny_csv, approach="generation")
    assert not auto.approach.first_token
    from trainables.errors import InputError

    with pytest.raises(InputError, match="first tokens differ"):
        _trainer(tiny_csv, approach="generation", **{"generation.scoring": "first_token"})


def test_checkpoint_resume_continues_exactly(tiny_csv, tmp_path):
    over = {"quantization": "none", "training.epochs": 2}
    a = _trainer(tiny_csv, **over)
    a.fit()
    b = _trainer(tiny_csv, **over)
    b.cfg.training.epochs = 1
    b.fit()
    b.save_checkpoint(tmp_path / "ck")
    c = _trainer(tiny_csv, **over)
    c.load_checkpoint(tmp_path / "ck")
    assert c.epoch == 1
    # the newest epoch was the best: its weights are the best weights, stored once
    assert not (tmp_path / "ck" / "best.safetensors").exists() and c.best.epoch == 1
    assert c.best.weights.keys() == c.trainable_state().keys()
    assert all(torch.equal(c.best.weights[k], v) for k, v in c.trainable_state().items())
    c.fit()
    sa, sc = a.trainable_state(), c.trainable_state()
    for k in sa:
        np.testing.assert_allclose(sa[k].numpy(), sc[k].numpy(), atol=1e-5, err_msg=k)
    assert [h["epoch"] for h in c.history] == [1, 2]
    # an earlier best epoch: its weights are stored beside the newest ones and come back as they were
    b.best.epoch = 0
    b.best.weights = {k: v + 1 for k, v in b.best.weights.items()}
    b.save_checkpoint(tmp_path / "ck2")
    d = _trainer(tiny_csv, **over)
    d.load_checkpoint(tmp_path / "ck2")
    assert all(torch.equal(d.best.weights[k], v) for k, v in b.best.weights.items())


def test_class_weights_balanced(tmp_path):
    from tests.conftest import write

    csv = write(tmp_path / "skew.csv", "text,label\n" + "".join(f"a {i},x\n" for i in range(30)) + "".join(f"b {i},y\n" for i in range(10)))
    tr = _trainer(csv, **{"head.class_weights": "balanced", "data.split": {"eval": 0.2, "test": 0.2, "seed": 0}})
    w = tr.class_weights.tolist()
    assert w[1] > w[0] and abs(w[1] / w[0] - 3.0) < 0.3


def test_train_cli_prints_summary_and_writes_folder(tiny_csv, yaml_file, cli, tmp_path):
    cfg = yaml_file(tiny_config(tiny_csv))
    code, out, err = cli("train", cfg, "--output", tmp_path / "o", "--set", "training.epochs=2")
    assert code == 0, err
    assert "final metrics" in out and "test" in out
    assert (tmp_path / "o" / "adapter" / "adapter_model.safetensors").is_file()
    code, out, err = cli("predict", "--model", tmp_path / "o", "--text", "a great day", "--text", "so bad")
    assert code == 0, err
    assert "p_neg" in out and "p_pos" in out
    # batch file -> file
    from tests.conftest import write

    inp = write(tmp_path / "in.csv", "text\nhello great\nvery bad\n")
    code, out, err = cli("predict", "--model", tmp_path / "o", "--input", inp, "--output", tmp_path / "pred.jsonl")
    assert code == 0, err
    import pandas as pd

    pred = pd.read_json(tmp_path / "pred.jsonl", lines=True)
    assert list(pred.columns[:2]) == ["text", "label"] and len(pred) == 2
    # refuses to overwrite a finished output folder
    code, _, err = cli("train", cfg, "--output", tmp_path / "o")
    assert code == 2 and "not empty" in err


def test_compile_setting_compiles_every_decoder_layer(tiny_csv):
    """``training.compile`` wraps each decoder layer in torch.compile (the GPU benchmarks time it)."""
    from trainables.config import RunConfig
    from trainables.data import load_dataset
    from trainables.loop import Trainer

    cfg = RunConfig.model_validate(tiny_config(tiny_csv, **{"training.compile": True, "quantization": "none"}))
    tr = Trainer(cfg, load_dataset(cfg.data), log=lambda *_: None)
    layers = [m for m in tr.model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    assert len(layers) == 2 and all(m._compiled_call_impl is not None for m in layers)


def test_liger_kernel_auto_is_on_only_where_its_kernels_can_run(monkeypatch):
    """``training.liger_kernel: auto`` puts Liger's layers in a Llama base on a CUDA GPU with the
    package installed and no compile; anywhere else it stays off (``true`` fails there instead)."""
    import importlib.util
    from types import SimpleNamespace

    from trainables.models import liger_wanted

    llama, other = (SimpleNamespace(config=SimpleNamespace(model_type=t)) for t in ("llama", "mistral"))
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "liger_kernel" else find(name, *a))
    assert liger_wanted("auto", False, llama, gpu)
    assert not any(liger_wanted("auto", c, m, d) for c, m, d in [(False, llama, cpu), (True, llama, gpu), (False, other, gpu)])
    assert liger_wanted(True, False, llama, cpu) and not liger_wanted(False, False, llama, gpu)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else find(name, *a))
    assert not liger_wanted("auto", False, llama, gpu)  # not installed
    # the default is auto: a CPU trainer builds a plain model
    assert RunConfig.model_validate(tiny_config("x.csv")).training.liger_kernel == "auto"


@pytest.mark.parametrize("approach", ["head", "generation"])
def test_reused_worker_trains_exactly_like_a_fresh_one(tiny_csv, approach):
    """Trials in a reused Ray worker share the cached tokenizer and tokenized splits, and the model
    with adapters that the previous trial built and trained, its trainable weights made fresh again:
    the adapter and head they train must be the same as from a fresh load."""
    from trainables import worker_cache

    cfg = RunConfig.model_validate(tiny_config(tiny_csv, approach=approach))
    worker_cache.clear()
    fresh = Trainer(cfg, load_dataset(cfg.data), log=lambda *_: None)
    fresh.fit()
    runs, examples = [], []
    models = []
    for _ in range(2):  # the second run reuses what the first one cached, its model trained by the first
        data, t0 = load_dataset(cfg.data), time.perf_counter()
        tr = Trainer(cfg, data, log=lambda *_: None, reuse=True)
        assert 0 < tr.setup_seconds <= time.perf_counter() - t0, tr.setup_parts  # each part counted once
        models.append(tr.model)
        tr.fit()
        runs.append(tr.trainable_state())
        examples.append(tr.encoded["train"])
        assert tr.train_examples == fresh.train_examples
    # train, eval, test; the base kept pristine, and the model with adapters the second run trained again
    assert [worker_cache.entries(s) for s in ("tokenizer", "encoded", "base", "model")] == [1, 3, 1, 1]
    assert models[0] is models[1]
    assert examples[0] is examples[1] and examples[0] == fresh.encoded["train"]
    other = RunConfig.model_validate(tiny_config(tiny_csv, approach=approach, **{"training.max_length": 12}))
    shorter = Trainer(other, load_dataset(other.data), log=lambda *_: None, reuse=True).train_examples
    assert max(len(e.input_ids) for e in shorter) <= 12 < max(len(e.input_ids) for e in examples[0])
    for state in runs:
        assert state.keys() == fresh.trainable_state().keys()
        for k, v in fresh.trainable_state().items():
            assert torch.equal(v, state[k]), k


def test_epochs_of_at_most_epoch_examples_walk_through_shuffled_passes():
    """training.epoch_examples: each epoch takes the next examples of a stream of shuffled passes, so
    consecutive epochs cover every example once per pass, and epoch k's examples depend on k alone."""
    from trainables.loop import epoch_examples

    assert epoch_examples(10, None, 0, 3) == epoch_examples(10, 10, 0, 3) == list(range(10))
    first_pass = [j for e in range(5) for j in epoch_examples(10, 2, 7, e)]
    assert sorted(first_pass) == list(range(10)) and first_pass != list(range(10))
    straddling = epoch_examples(10, 4, 7, 2)  # examples 8-11 of the stream: the end of pass 0, the start of pass 1
    assert len(straddling) == 4 and len(set(straddling)) == 4
    assert epoch_examples(10, 4, 7, 2) == straddling and epoch_examples(10, 4, 8, 2) != straddling
    second_pass = [j for e in range(5, 10) for j in epoch_examples(10, 2, 7, e)]
    assert sorted(second_pass) == list(range(10)) and second_pass != first_pass


def test_a_trainer_with_epoch_examples_trains_that_many_per_epoch(tiny_csv):
    full = _trainer(tiny_csv, quantization="none")
    n = len(full.train_examples)
    tr = _trainer(tiny_csv, quantization="none", **{"training.epoch_examples": n // 2, "training.batch_size": 4})
    seen = []
    collate = tr.approach.collate
    tr.approach.collate = lambda batch, train: (seen.extend(id(e) for e in batch), collate(batch, train))[1]
    metrics = []
    for epoch in range(2):
        tr.epoch = epoch  # as fit() counts them
        metrics.append(tr.train_epoch())
    assert tr.examples_per_epoch == n // 2 and tr.batches_per_epoch == -(-(n // 2) // 4)
    assert len(seen) == 2 * (n // 2) and len(set(seen)) == 2 * (n // 2)  # two halves of one pass
    assert all(m["train_samples_per_second"] > 0 and m["train_loss"] > 0 for m in metrics)


@pytest.mark.parametrize("multiple", [1, 8])
def test_batches_are_padded_as_the_tokenizer_pads(tiny_csv, multiple):
    """The approaches pad each batch themselves (the tokenizer's ``pad`` is ten times slower): the
    same ids and attention mask as ``tokenizer.pad`` gives, right-padded to a multiple."""
    tr = _trainer(tiny_csv, **{"training.pad_to_multiple_of": multiple})
    rng = np.random.default_rng(0)
    for lengths in ([3, 9, 1], [multiple * 2], [0, 5], [17] * 4):
        seqs = [rng.integers(5, 200, n).tolist() for n in lengths]
        ids, mask = tr.approach._pad(seqs)
        want = tr.tokenizer.pad({"input_ids": seqs}, padding=True, pad_to_multiple_of=multiple,
                                return_tensors="pt", return_attention_mask=True)
        assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"]), lengths
        assert ids.dtype == want["input_ids"].dtype and ids.shape[1] % multiple == 0


@pytest.mark.parametrize("approach", ["head", "generation"])
@pytest.mark.parametrize("bf16,dropout", [(False, 0.0), (False, 0.1), (True, 0.0)])
def test_fused_lora_layers_give_peft_s_loss_and_gradients(tiny_csv, approach, bf16, dropout):
    """training.fused_lora: every LoRA layer over a plain linear base takes the fused path (4-bit
    layers keep peft's), and a training step's loss and gradients are peft's: to float32 rounding,
    with dropout too; under bf16 autocast, about as close to the float32 step as peft's are (within 25%)."""
    from peft.tuners.lora import LoraLayer

    from trainables.fused_lora import FusedLoraLinear, _LoraLinear

    assert not any(isinstance(m, FusedLoraLinear) for m in _trainer(tiny_csv, approach=approach).model.modules())
    over = {"training.bf16": bf16, "lora.dropout": dropout}
    peft_tr = _trainer(tiny_csv, approach=approach, quantization="none", **over, **{"training.fused_lora": False})
    tr = _trainer(tiny_csv, approach=approach, quantization="none", **over)
    fused = [m for m in tr.model.modules() if isinstance(m, FusedLoraLinear)]
    assert fused and len(fused) == sum(isinstance(m, LoraLayer) for m in tr.model.modules())
    for t in (peft_tr, tr):  # LoRA's B starts at zero: give both the same non-zero values, so its path counts
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in t.model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    batch = tr.approach.collate(tr.train_examples[:4], train=True)

    def step(t, autocast: bool):
        t.model.train()
        t.model.zero_grad()
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = t.approach.loss(t.model, batch, None)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in t.trainable])

    reference = step(peft_tr, False) if bf16 else None  # peft, float32
    calls = []
    apply = _LoraLinear.apply
    _LoraLinear.apply = lambda *a: calls.append(1) or apply(*a)
    try:
        (a, ga), (b, gb) = step(peft_tr, bf16), step(tr, bf16)
    finally:
        _LoraLinear.apply = apply
    assert len(calls) == len(fused)  # each fused layer once, in the fused trainer's pass only
    if not bf16:
        assert a == pytest.approx(b, rel=1e-6) and a > 0
        assert (ga - gb).abs().max() <= 1e-5 * ga.abs().max()
    else:
        loss32, g32 = reference
        assert abs(b - loss32) <= 1.25 * max(abs(a - loss32), 1e-3 * loss32)
        assert (gb - g32).norm() <= 1.25 * max((ga - g32).norm(), 1e-3 * g32.norm()), ((gb - g32).norm(), (ga - g32).norm())


def test_a_kept_model_serves_trials_with_another_lora_alpha_and_dropout(tiny_csv, tmp_path):
    """A reused worker keeps its model with adapters across trials that differ only in lora.alpha and
    lora.dropout (numbers, not modules): the trial trains as a fresh one with those settings would,
    and its saved adapter says its own alpha. A trial with another rank gets a model of its own."""
    from trainables import worker_cache

    def cfg(**over):
        return RunConfig.model_validate(tiny_config(tiny_csv, **{"lora.dropout": 0.1, **over}))

    worker_cache.clear()
    first = Trainer(cfg(**{"lora.alpha": 4}), load_dataset(cfg().data), log=lambda *_: None, reuse=True)
    first.fit()
    other = cfg(**{"lora.alpha": 32, "lora.dropout": 0.2})
    kept = Trainer(other, load_dataset(other.data), log=lambda *_: None, reuse=True)
    assert kept.model is first.model
    kept.fit()
    fresh = Trainer(other, load_dataset(other.data), log=lambda *_: None)
    fresh.fit()
    for k, v in fresh.trainable_state().items():
        assert torch.equal(v, kept.trainable_state()[k]), k
    kept.model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["lora_alpha"], saved["lora_dropout"]) == (32, 0.2)
    wider = cfg(**{"lora.r": 4})
    assert Trainer(wider, load_dataset(wider.data), log=lambda *_: None, reuse=True).model is not first.model


@pytest.mark.parametrize("approach", ["head", "generation"])
def test_right_padded_batches_score_as_with_a_mask(tiny_csv, approach):
    """Batches are padded on the right, so models run causal attention without a mask
    (``models.right_padded_attention``): on a batch of rows of several lengths the scores and the
    loss are those of transformers' masked SDPA, and so is a greedy completion."""
    from trainables.models import RIGHT_PADDED_SDPA

    tr = _trainer(tiny_csv, approach=approach)
    base = tr.model.get_base_model()
    assert base.config._attn_implementation == RIGHT_PADDED_SDPA
    rows = sorted(tr.encoded["eval"], key=lambda e: len(e.input_ids))
    scored = tr.approach.collate([rows[0], rows[len(rows) // 2], rows[-1]], train=False)
    trained = tr.approach.collate(tr.train_examples[:5], train=True)
    assert (scored["attention_mask"] == 0).any() and (trained["attention_mask"] == 0).any()
    tr.model.eval()

    def outputs():
        with torch.no_grad():
            done = {"scores": tr.approach.log_scores(tr.model, scored), "loss": tr.approach.loss(tr.model, trained, None)}
        if approach == "generation":
            done["completion"] = tr.approach.generate(tr.model, ["what a day, just"], torch.device("cpu"), 4)
        return done

    ours = outputs()
    base.set_attn_implementation("sdpa")
    theirs = outputs()
    base.set_attn_implementation(RIGHT_PADDED_SDPA)
    torch.testing.assert_close(ours["scores"], theirs["scores"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["loss"], theirs["loss"], atol=1e-5, rtol=1e-5)
    assert ours.get("completion") == theirs.get("completion")
