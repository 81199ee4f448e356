"""Parameter importances from a study's trials as MLflow holds them (string params)."""

from __future__ import annotations

import random
import types

import pandas as pd

from tests.conftest import learnable_csv, tiny_study
from tuner import importance
from tuner.study_config import load_study


def test_the_parameter_that_decides_the_metric_is_the_most_important(tmp_path, yaml_file):
    cfg = tiny_study(learnable_csv(tmp_path / "d.csv"))
    cfg["search"]["lora.target_modules"] = {"choice": ["all-linear", ["q_proj", "v_proj"]]}
    study, _ = load_study(yaml_file(cfg))
    rec = types.SimpleNamespace(study=study, name="s")
    rng = random.Random(0)
    rows = []
    for _ in range(12):
        lr, r = 10 ** rng.uniform(-3, -2), rng.choice([4, 8])
        targets = rng.choice(['"all-linear"', '["q_proj", "v_proj"]'])  # as MLflow params hold them
        rows.append({"approach": rng.choice(["head", "generation"]), "training.learning_rate": str(lr),
                     "lora.r": str(r), "lora.target_modules": targets.strip('"'),
                     f"best_{study.metric}": 0.5 + 40 * lr + 0.001 * r})  # the learning rate decides
    rows.append({"approach": "head", f"best_{study.metric}": float("nan")})  # an errored trial: no value
    imp = importance.importances(rec, pd.DataFrame(rows))
    assert next(iter(imp)) == "training.learning_rate" and abs(sum(imp.values()) - 1) < 1e-6, imp
    assert set(imp) == {"approach", "training.learning_rate", "lora.r", "lora.target_modules"}
    assert importance.write_plots(rec, pd.DataFrame(rows), tmp_path) == ["param_importances.png", "parallel_coordinate.png"]
    assert importance.importances(rec, pd.DataFrame(rows[:1])) == {}  # one trial: nothing to compare
