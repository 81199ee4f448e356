"""Classification metrics, confusion matrices and their plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

METRICS = ("accuracy", "f1_macro", "balanced_accuracy")


def summary(y_true, y_pred, n_classes: int) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    labels = list(range(n_classes))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "f1_macro": float(f1_score(y_true, y_pred, average="macro", labels=labels, zero_division=0)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        }


def report(y_true, y_pred, names: list[str]) -> dict:
    """Per-class precision/recall/F1/support plus the confusion matrix (rows: true, cols: predicted)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = list(range(len(names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        **summary(y_true, y_pred, len(names)),
        "per_class": {n: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, n in enumerate(names)},
        "labels": names,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def plot_confusion(cm: list[list[int]], names: list[str], title: str, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # minimal images (e.g. a GPU worker without matplotlib): JSON only
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * len(names), 1.0 + 0.8 * len(names)), dpi=110)
    ConfusionMatrixDisplay(np.asarray(cm), display_labels=names).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45, values_format="d")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_reports(reports: dict[str, dict], folder: Path) -> list[Path]:
    """``confusion_<split>.json`` and ``.png`` for each split; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for split, rep in reports.items():
        j = folder / f"confusion_{split}.json"
        j.write_text(json.dumps({"labels": rep["labels"], "matrix": rep["confusion_matrix"],
                                 "per_class": rep["per_class"]}, indent=2))
        png = folder / f"confusion_{split}.png"
        plot_confusion(rep["confusion_matrix"], rep["labels"],
                       f"{split}: accuracy {rep['accuracy']:.3f}, macro-F1 {rep['f1_macro']:.3f}", png)
        out += [j, png]
    return out
