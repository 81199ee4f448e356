"""``resources_per_trial.gpu: auto``: the largest trial of a space, and the share of a card it gets."""

from __future__ import annotations

import pytest

from tests.conftest import learnable_csv, tiny_study
from trainables.errors import InputError
from trainables.footprint import Footprint
from tuner.packing import GiB, largest_settings, share_of_card
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
