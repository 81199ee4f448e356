"""``qlora-tune demo``: study -> promote -> classify with the registered champion."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from tuner.console import console

DEMO_MODEL = "qlora-tune-demo"
SENTENCES = [
    "The new update is fantastic and everything feels faster.",
    "My order arrived broken and nobody answers my emails.",
    "The store opens at nine on Saturdays.",
    "What a lovely surprise, thank you so much!",
    "The train was cancelled again and I missed my meeting.",
]


def run_demo(name: str | None, overrides: list[str]) -> None:
    from trainables.predict import Classifier
    from tuner.promote import promote
    from tuner.refs import local_model_folder
    from tuner.study import run_study

    study_file = Path(__file__).resolve().parent / "examples" / "demo-study.yaml"
    name = name or f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    console.rule("1/3 search: both approaches on smollm2-135m (NF4) and the demo data")
    run_study(study_file, overrides, name, None)
    console.rule("2/3 promote the best trial")
    # the demo always moves its alias to this run's winner (a fresh registry version each time)
    info = promote(name, None, DEMO_MODEL, "champion", force=True)
    console.rule(f"3/3 classify with {info['uri']}")
    pred = Classifier(local_model_folder(info["uri"])).predict(SENTENCES)
    for text, label, probs in zip(SENTENCES, pred.labels, pred.probabilities):
        console.print(f"  [bold]{label:>8}[/] ({probs.max():.2f})  {text}")
    console.print()
    console.print(f"[bold]study[/]: {name}   (qlora-tune status {name})")
    console.print(f"[bold]registry[/]: {DEMO_MODEL} version {info['version']} @champion, "
                  f"test accuracy {info['test']['accuracy']:.3f}")
    console.print("[bold]MLflow UI[/]: qlora-tune ui   (prints the URL of the local server)")
    console.print(f"[bold]serve[/]: qlora-tune serve {info['uri']} --port 8080")
