"""Set-up of a trial in a reused worker, by part (``Trainer.setup_parts``): the median of 5 runs after a
first one fills the worker's caches, per approach. Runs on the CPU too (issue 14's reused start-up).

    python benchmarks/setup_reused.py /tmp/rs-cpu        # a model folder (benchmarks/random_model.py)
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import bench  # noqa: E402

from trainables.data import load_dataset  # noqa: E402
from trainables.loop import Trainer  # noqa: E402

bench.model_ref = lambda: sys.argv[1]
for approach in ("head", "generation"):
    cfg = bench.run_config(approach, epochs=1, rows=200)
    data = load_dataset(cfg.data)
    Trainer(cfg, data, log=lambda *_: None, reuse=True)  # the worker's first trial fills the caches
    parts = []
    for _ in range(5):
        parts.append(Trainer(cfg, data, log=lambda *_: None, reuse=True).setup_parts)
    print(approach, {k: round(statistics.median(p[k] for p in parts), 3) for k in parts[0]},
          "total", round(statistics.median(sum(p.values()) for p in parts), 3))
