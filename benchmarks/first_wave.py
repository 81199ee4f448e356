"""Where a study's first wave spends its start (issue 15): N fresh processes started at once, each doing
what a fresh trial does before and through its first epoch, phase by phase (seconds since the launch).
SmolLM2-135M's shape with random weights (``BENCH_MODEL=random``), NF4, 2,000 rows, batch 64, as the
64-trial study's trials.

    BENCH_MODEL=random bash benchmarks/gpu_run.sh first_wave.py 1 11 11:importtime

Each argument is one wave: ``N`` processes, ``N:importtime`` with ``-X importtime`` (the slowest
modules, cumulative, of the wave's slowest process are listed).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def child(i: int, t0: float, out: str, approach: str) -> None:
    marks = {"python": time.time() - t0}

    def mark(k: str) -> None:
        marks[k] = round(time.time() - t0, 3)

    import ray.tune  # noqa: F401  (a trial's function imports it first)

    mark("ray.tune")
    import torch

    mark("torch")
    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")
    mark("cuda")
    import mlflow  # noqa: F401

    mark("mlflow")
    from trainables.data import load_dataset
    from trainables.loop import Trainer

    mark("trainables")
    from bench import run_config

    torch.set_num_threads(1)
    cfg = run_config(approach, rows=int(os.environ.get("FIRST_WAVE_ROWS", "2000")), epochs=1, batch=64)
    data = load_dataset(cfg.data)
    mark("dataset")
    tr = Trainer(cfg, data, log=lambda *_: None, reuse=False)
    mark("trainer")
    step, n = tr.scheduler.step, [0]

    def timed_step(*a, **k):
        r = step(*a, **k)
        n[0] += 1
        if n[0] == 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            mark("first_step")
        return r

    tr.scheduler.step = timed_step
    tr.fit()
    mark("epoch1")
    Path(out).write_text(json.dumps({"marks": marks, "setup_parts": tr.setup_parts}))


def wave(n: int, importtime: bool) -> dict:
    tmp = Path(tempfile.mkdtemp())
    t0 = time.time()
    procs = []
    for i in range(n):
        args = [sys.executable] + (["-X", "importtime"] if importtime else []) + [
            __file__, "child", str(i), str(t0), str(tmp / f"{i}.json"), ("head", "generation")[i % 2]]
        procs.append(subprocess.Popen(args, stderr=open(tmp / f"{i}.err", "w"), env={**os.environ, "OMP_NUM_THREADS": "1"}))
    for p in procs:
        p.wait()
    runs = [json.loads((tmp / f"{i}.json").read_text()) for i in range(n) if (tmp / f"{i}.json").exists()]
    if len(runs) < n:
        print((tmp / "0.err").read_text()[-3000:])
    keys = list(runs[0]["marks"])
    summary = {"n": n, "importtime": importtime,
               "marks_median": {k: round(statistics.median(r["marks"][k] for r in runs), 2) for k in keys},
               "marks_max": {k: round(max(r["marks"][k] for r in runs), 2) for k in keys},
               "setup_parts_median": {k: round(statistics.median(r["setup_parts"][k] for r in runs), 2)
                                      for k in runs[0]["setup_parts"]}}
    if importtime:
        slow = max(range(len(runs)), key=lambda i: runs[i]["marks"]["trainables"])
        rows = []
        for line in (tmp / f"{slow}.err").read_text().splitlines():
            if line.startswith("import time:") and "|" in line and "cumulative" not in line:
                self_us, cum_us, name = line.removeprefix("import time:").split("|")
                rows.append((int(cum_us), int(self_us), name.rstrip()))
        top = [r for r in rows if not r[2].startswith("  ")]  # top level: one space after the bar
        summary["top_level_imports_s"] = [(n.strip(), round(c / 1e6, 2)) for c, _, n in sorted(top, reverse=True)[:15]]
        summary["slowest_self_s"] = [(n.strip(), round(s / 1e6, 2)) for _, s, n in sorted(rows, key=lambda r: -r[1])[:15]]
    print(json.dumps(summary, indent=1), flush=True)
    return summary


def main(argv: list[str]) -> None:
    if argv[0] == "child":
        child(int(argv[1]), float(argv[2]), argv[3], argv[4])
        return
    from bench import model_ref, save

    model_ref()  # build the random model once, before any wave
    out = []
    for a in argv:
        n, _, opt = a.partition(":")
        out.append(wave(int(n), opt == "importtime"))
    save({"first_wave_probe": out})


if __name__ == "__main__":
    main(sys.argv[1:])
