"""Issue 15's scale-out curve: trials/hour of one study against the GPUs it ran on, with the ideal line
(n times the 1-GPU run), from the ``study_<tag>`` records that ``bench.py study`` writes.

    python benchmarks/scaleout.py study_s64_1gpu_s13 study_s64_2gpu [...]

Each named record of ``benchmarks/results.json`` (``RESULTS`` in the environment names another file)
is a point at its GPU count; all must have run the same study (the same ``sets``), one of them on one
GPU. It writes ``benchmarks/scaleout.png``, prints a Markdown table, and stores ``scaleout_<n>gpu``
(the ratio to 1 GPU) and the records it used in the results file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLOT = ROOT / "benchmarks" / "scaleout.png"


def points(results: dict, keys: list[str]) -> dict[int, dict]:
    """GPU count -> the record of that run, for the records ``keys`` of ``results``."""
    runs: dict[int, dict] = {}
    for key in keys:
        rec = results.get(key)
        if not isinstance(rec, dict) or "gpus" not in rec or "trials_per_hour" not in rec:
            raise SystemExit(f"{key}: no study record with gpus and trials_per_hour")
        first = next(iter(runs.values()), None)
        if first is not None and sorted(rec.get("sets", [])) != sorted(first.get("sets", [])):
            raise SystemExit(f"{key} ran other settings ({rec.get('sets')}) than {first['key']} ({first.get('sets')})")
        if int(rec["gpus"]) in runs:
            raise SystemExit(f"{key} and {runs[int(rec['gpus'])]['key']} both ran on {rec['gpus']} GPU(s)")
        runs[int(rec["gpus"])] = {**rec, "key": key}
    return runs


def plot(runs: dict[int, dict], tag: str, dest: Path = PLOT) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpus = sorted(runs)
    base = runs[1]["trials_per_hour"]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ideal = range(1, max(gpus + [2]) + 1)
    ax.plot(list(ideal), [base * n for n in ideal], "--", color="grey", label="ideal (n x 1 GPU)")
    ax.plot(gpus, [runs[n]["trials_per_hour"] for n in gpus], "o-", label="measured (wall clock)")
    for n in gpus:
        ax.annotate(f"{runs[n]['trials_per_hour']:.0f}", (n, runs[n]["trials_per_hour"]),
                    textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.set(xlabel="GPUs (H200)", ylabel="trials/hour", title=f"{tag}: {runs[1].get('trials', '?')} trials",
           xticks=list(ideal))
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dest, dpi=120)
    plt.close(fig)


def main(*keys: str) -> None:
    import os

    target = Path(os.environ.get("RESULTS", ROOT / "benchmarks" / "results.json"))
    results = json.loads(target.read_text())
    runs = points(results, list(keys))
    if 1 not in runs:
        raise SystemExit(f"none of {', '.join(keys)} ran on one GPU")
    base = runs[1]["trials_per_hour"]
    print("| GPUs | trials/hour (wall) | vs 1 GPU | ideal | GPU util | card |")
    print("| --- | --- | --- | --- | --- | --- |")
    out = {}
    for n in sorted(runs):
        r = runs[n]
        ratio = r["trials_per_hour"] / base
        print(f"| {n} | {r['trials_per_hour']:.0f} | {ratio:.2f}x | {n}.00x | {r.get('gpu_util', 0):.1%} | {r.get('card', '?')} |")
        if n > 1:
            out[f"scaleout_{n}gpu"] = ratio
    plot(runs, runs[1]["key"])
    results.update(out)
    results["scaleout_points"] = {str(n): runs[n]["key"] for n in sorted(runs)}
    target.write_text(json.dumps(results, indent=2))
    print(f"wrote {PLOT.relative_to(ROOT)}; {', '.join(f'{k} {v:.2f}' for k, v in out.items()) or 'one GPU count only'}")


if __name__ == "__main__":
    main(*sys.argv[1:])
