"""``resources_per_trial.gpu: auto``: the largest trial of a space, and the share of a card it gets."""

from __future__ import annotations

import pytest

from tests.conftest import learnable_csv, tiny_config, tiny_study
from tests.faults import capture_eagerly
from trainables.config import RunConfig
from trainables.errors import InputError
from trainables.footprint import Footprint, probe_words, synthetic_data
from trainables.graphs import bucket_length
from trainables.loop import Trainer
from tuner.packing import GiB, kept_bytes, largest_settings, share_of_card
from tuner.study_config import load_study


@pytest.fixture
def study(tmp_path, yaml_file):
    cfg = tiny_study(learnable_csv(tmp_path / "d.csv"), **{"resources_per_trial.gpu": "auto"})
    cfg["search"] = {"approach": {"choice": ["head", "generation"]},
                     "training.batch_size": {"choice": [8, 32, 16]},
                     "training.max_length": {"int": [32, 96]},
                     "lora.r": {"choice": [4, 16]}}
    return load_study(yaml_file(cfg))


def test_the_largest_trial_takes_every_largest_setting(study):
    s, space = study
    assert s.resources_per_trial.gpu == "auto"
    for approach in ("head", "generation"):
        cfg = largest_settings(s, space, approach)
        assert cfg["approach"] == approach
        assert (cfg["training"]["batch_size"], cfg["training"]["max_length"], cfg["lora"]["r"]) == (32, 96, 16)


def test_a_card_is_shared_by_as_many_trials_as_fit_and_have_cpus(study, capsys):
    s, space = study
    cfg = largest_settings(s, space, "head")
    fp = Footprint(peak_bytes=10 * GiB, card_bytes=140 * GiB)
    # 0.92 x 140 GiB over (1.15 x 10 GiB + 1 GiB per process) = 10.3 -> 10 trials
    assert share_of_card(fp, cfg, {"GPU": 2, "CPU": 64}, 1.0, "s.yaml") == pytest.approx(1 / 10)
    assert "10 trial(s) per card" in capsys.readouterr().out
    assert share_of_card(fp, cfg, {"GPU": 2, "CPU": 8}, 1.0, "s.yaml") == pytest.approx(1 / 4)  # 4 CPUs per card
    assert share_of_card(Footprint(100 * GiB, 140 * GiB), cfg, {"GPU": 1, "CPU": 16}, 1.0, "s.yaml") == 1.0
    # reused workers keep pristine bases (here 2 x 2.5 GiB) besides the trial: 128.8 / 17.5 -> 7 trials
    capsys.readouterr()
    assert share_of_card(fp, cfg, {"GPU": 2, "CPU": 64}, 1.0, "s.yaml", kept_bytes=5 * GiB) == pytest.approx(1 / 7)
    assert "peaked at 10.0 GiB (and 5.00 GiB of pristine bases a reused worker keeps) of 140 GiB" in capsys.readouterr().out


def test_reused_workers_are_the_default_and_the_fit_counts_the_bases_they_keep(tmp_path, yaml_file):
    """``reuse_actors`` defaults to on; a trainer reports its base's bytes as loaded (what a reused
    worker keeps a pristine copy of, per approach): 4-bit weights take about a quarter of float32's."""
    from trainables.data import load_dataset

    s, _ = load_study(yaml_file(tiny_study(learnable_csv(tmp_path / "d.csv"))))
    assert s.reuse_actors is True
    sizes = {}
    for q in ("nf4", "none"):
        cfg = RunConfig.model_validate(tiny_config(learnable_csv(tmp_path / "d.csv"), quantization=q))
        tr = Trainer(cfg, load_dataset(cfg.data), log=lambda *_: None)
        sizes[q] = tr.base_bytes
        embed = tr.model.get_input_embeddings().weight
        assert tr.base_bytes > embed.numel() * embed.element_size()
    assert sizes["nf4"] < 0.75 * sizes["none"], sizes
    fps = [Footprint(10 * GiB, 140 * GiB, sizes["nf4"]), Footprint(12 * GiB, 140 * GiB, sizes["nf4"] + 1)]
    assert kept_bytes(s, fps) == 2 * (sizes["nf4"] + 1)  # a pristine base per approach, the larger
    assert kept_bytes(s.model_copy(update={"reuse_actors": False}), fps) == 0


def test_a_space_whose_largest_trial_cannot_fit_fails_naming_the_settings(study):
    s, space = study
    cfg = largest_settings(s, space, "generation")
    with pytest.raises(InputError) as e:
        share_of_card(Footprint(130 * GiB, 140 * GiB), cfg, {"GPU": 1, "CPU": 16}, 1.0, "s.yaml")
    msg = str(e.value)
    assert msg.startswith("s.yaml: resources_per_trial.gpu: auto: a generation trial at training.batch_size 32, "
                          "training.max_length 96 and lora.r 16") and "\n" not in msg, msg


def test_gpu_takes_a_number_or_auto(tmp_path, yaml_file):
    cfg = tiny_study(learnable_csv(tmp_path / "d.csv"), **{"resources_per_trial.gpu": "most"})
    with pytest.raises(InputError) as e:
        load_study(yaml_file(cfg))
    assert "resources_per_trial.gpu" in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("gpus", [4, 8])
def test_plans_for_four_and_eight_gpu_nodes(tmp_path, yaml_file, gpus):
    """What a study asks of a 4- or 8-GPU node (issue 17, simulated: no such node is lent): packed
    trials get a share of a card, data-parallel trials of 2 and 4 workers run as many at once as the
    node holds, packing follows the node's CPUs per card, and a trial wider than the node fails first."""
    from tuner.ray_cluster import check_resources
    from tuner.study import _concurrency

    node = {"GPU": float(gpus), "CPU": 16.0 * gpus}
    packed, _ = load_study(yaml_file(tiny_study(learnable_csv(tmp_path / "d.csv"), max_concurrent_trials=None,
                                                **{"resources_per_trial.gpu": 0.25, "resources_per_trial.cpu": 2})))
    assert check_resources(packed, "s.yaml", node) == {"cpu": 2, "gpu": 0.25}
    assert _concurrency(packed, {"cpu": 2, "gpu": 0.25}, node) is None  # Tune packs 4 per card by itself
    for workers in (2, 4):
        s, _ = load_study(yaml_file(tiny_study(learnable_csv(tmp_path / "d.csv"), max_concurrent_trials=None, **{
            "resources_per_trial.workers": workers, "resources_per_trial.gpus_per_worker": 1,
            "resources_per_trial.cpu": 2})))
        res = check_resources(s, "s.yaml", node)
        assert res == {"cpu": 2, "gpu": float(workers)}
        assert _concurrency(s, res, node) == gpus // workers
    wide, _ = load_study(yaml_file(tiny_study(learnable_csv(tmp_path / "d.csv"), **{
        "resources_per_trial.workers": 2 * gpus, "resources_per_trial.gpus_per_worker": 1})))
    with pytest.raises(InputError, match=f"a trial needs {2 * gpus} GPU\\(s\\) but the cluster has {gpus}"):
        check_resources(wide, "s.yaml", node)
    cfg = {"approach": "head", "training": {"batch_size": 64, "max_length": 96}, "lora": {"r": 16}}
    # 16 CPUs per card at 2 per trial caps a card at 8 trials however small they are
    assert share_of_card(Footprint(1 * GiB, 140 * GiB), cfg, node, 2.0, "s.yaml") == pytest.approx(1 / 8)


def test_gpu_defaults_to_auto_and_is_quiet_on_a_cpu_cluster(tmp_path, yaml_file, capsys):
    """No ``gpu`` in the file: ``auto`` (GPU clusters measure and pack; a CPU cluster runs trials on the
    CPU without a warning); ``auto`` written out warns there; data-parallel trials keep their GPUs per
    worker, unchanged."""
    from tuner.packing import resolve_auto_gpu

    quiet, space = load_study(yaml_file(tiny_study(learnable_csv(tmp_path / "d.csv"))))
    assert quiet.resources_per_trial.gpu == "auto"
    assert resolve_auto_gpu(quiet, space, "s.yaml", ["a", "b"], {"CPU": 2.0}).resources_per_trial.gpu == 0.0
    assert "warning" not in capsys.readouterr().out
    loud, space = load_study(yaml_file(tiny_study(learnable_csv(tmp_path / "d.csv"), **{"resources_per_trial.gpu": "auto"})))
    assert resolve_auto_gpu(loud, space, "s.yaml", ["a", "b"], {"CPU": 2.0}).resources_per_trial.gpu == 0.0
    assert "no GPU; trials run on the CPU" in capsys.readouterr().out
    dp, space = load_study(yaml_file(tiny_study(learnable_csv(tmp_path / "d.csv"), **{
        "resources_per_trial.workers": 2, "resources_per_trial.gpus_per_worker": 1})))
    assert resolve_auto_gpu(dp, space, "s.yaml", ["a", "b"], {"CPU": 8.0, "GPU": 2.0}) is dp


@pytest.mark.parametrize("approach", ["head", "generation"])
def test_the_footprint_fit_captures_every_length_bucket_a_trial_can_reach(tmp_path, approach, monkeypatch):
    """gpu: auto sizes trials by one short fit, which must hold what a real trial holds: a graph per
    length bucket its batches can fall in, each captured after its warm-up (a fit at the longest length
    alone measured about half of what graphed trials then held, and 15 of them on an H200 overflowed it)."""
    import trainables.step_graphs as SG

    monkeypatch.setattr(SG, "capture_graph", capture_eagerly)  # capture, then replay, as on a GPU
    cfg = RunConfig.model_validate(tiny_config(learnable_csv(tmp_path / "d.csv"), approach=approach, quantization="none", **{
        "training.cuda_graphs": True, "training.max_length": 64, "training.batch_size": 4, "training.eval_batch_size": 8}))
    labels = ["neg", "pos", "neutral"]
    data = synthetic_data(cfg, labels)
    tr = Trainer(cfg, data, log=lambda *_: None, every_bucket=True)  # as footprint.measure makes it
    tr._graphed_steps().capture = True
    tr.train_epoch()
    ap = tr.approach
    shortest, longest = (len(ap.training_examples(ap.encode([" ".join(["word"] * k)], [0]))[0].input_ids) for k in (1, 64))
    reachable = {bucket_length(n) for n in range(shortest, longest + 1)}
    assert len(reachable) >= 3 and set(tr.step_graphs.graphs) == reachable, (sorted(tr.step_graphs.graphs), reachable)
    assert tr.step_graphs.captured == len(reachable) and tr.step_graphs.failed is None
    assert len(data.eval) % cfg.training.eval_batch_size  # a last, partial evaluation batch


def test_the_fits_probes_are_few_and_reach_every_bucket_up_to_any_max_length():
    for max_length in (8, 64, 256, 300, 4096, 32768):
        ks = probe_words(max_length)
        assert ks[0] == 1 and ks[-1] == max_length and ks == sorted(set(ks)) and len(ks) <= 400, (max_length, len(ks))
        # at one or more tokens a word, consecutive probes sit closer than the buckets are wide
        assert all(b - a == 1 if b <= 256 else b <= a * 1.06 + 1 for a, b in zip(ks, ks[1:]))


def test_the_fit_is_kept_per_settings_labels_and_card_kind_and_refit_measures_again(study, tmp_path, monkeypatch):
    """A study after the first on the same model, settings and card kind takes gpu: auto's footprints
    from the fit cache; anything a trial's memory depends on is a new key; --refit measures again."""
    from tuner import fit_cache
    from tuner.packing import footprints

    monkeypatch.setenv("QLORA_TUNE_HOME", str(tmp_path / "home"))
    s, space = study
    cfgs = [largest_settings(s, space, a) for a in ("head", "generation")]
    h200 = {"GPU": 1.0, "CPU": 16.0, "accelerator_type:H200": 1.0}
    fitted: list[int] = []

    def measure(c, labels):
        fitted.append(len(c))
        return [Footprint((i + 1) * GiB, 140 * GiB, GiB // 4) for i in range(len(c))]

    fps, note = footprints(cfgs, ["a", "b"], h200, measure=measure)
    assert fitted == [2] and note == ""
    again, note = footprints(cfgs, ["a", "b"], h200, measure=measure)
    assert fitted == [2] and again == fps and "kept in the fit cache" in note
    footprints(cfgs, ["a", "b"], h200, refit=True, measure=measure)
    assert fitted == [2, 2]
    bigger = [dict(c, training={**c["training"], "batch_size": 64}) for c in cfgs]
    other_data = [dict(c, data={**c["data"], "train": "elsewhere.csv"}) for c in cfgs]
    key = fit_cache.fit_key(cfgs, ["a", "b"], h200)
    assert fit_cache.fit_key(other_data, ["a", "b"], h200) == key  # the fit trains on synthetic texts
    assert len({key, fit_cache.fit_key(bigger, ["a", "b"], h200), fit_cache.fit_key(cfgs, ["a", "b", "c"], h200),
                fit_cache.fit_key(cfgs, ["a", "b"], {"GPU": 1.0, "accelerator_type:A100": 1.0})}) == 4
    # no known card kind, or two kinds (the fit's card could be either): never from the cache
    assert fit_cache.fit_key(cfgs, ["a", "b"], {"GPU": 1.0, "CPU": 16.0}) is None
    assert fit_cache.fit_key(cfgs, ["a", "b"], {**h200, "accelerator_type:A100": 1.0}) is None
    footprints(cfgs, ["a", "b"], {"GPU": 1.0, "CPU": 16.0}, measure=measure)
    footprints(cfgs, ["a", "b"], {"GPU": 1.0, "CPU": 16.0}, measure=measure)
    assert fitted == [2, 2, 2, 2]
    # an unreadable entry is a miss, measured and written again
    (tmp_path / "home" / "fits" / f"{key}.json").write_text("{not json")
    footprints(cfgs, ["a", "b"], h200, measure=measure)
    assert fitted == [2, 2, 2, 2, 2] and fit_cache.load(key)[0] == fps


def test_gpu_auto_takes_a_kept_fit_without_measuring(study, tmp_path, monkeypatch, capsys):
    """A kept fit packs the study as a measured one would (no GPU, no Ray here: nothing measures)."""
    from tuner import fit_cache
    from tuner.packing import resolve_auto_gpu

    monkeypatch.setenv("QLORA_TUNE_HOME", str(tmp_path / "home"))
    s, space = study
    h200 = {"GPU": 1.0, "CPU": 64.0, "accelerator_type:H200": 1.0}
    cfgs = [largest_settings(s, space, a) for a in space.approaches(s.approach)]
    fit_cache.save(fit_cache.fit_key(cfgs, ["a", "b"], h200),
                   [Footprint(10 * GiB, 140 * GiB, GiB), Footprint(8 * GiB, 140 * GiB, GiB)])
    got = resolve_auto_gpu(s, space, "s.yaml", ["a", "b"], h200)
    # 0.92 x 140 GiB over (1.15 x 10 GiB + 2 x 1 GiB of kept bases + 1 GiB per process) = 8.6 -> 8
    assert got.resources_per_trial.gpu == pytest.approx(1 / 8)
    out = capsys.readouterr().out
    assert "8 trial(s) per card" in out and "kept in the fit cache" in out, out
