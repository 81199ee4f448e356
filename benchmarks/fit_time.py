"""Where ``resources_per_trial.gpu: auto``'s fit spends its time, in a fresh process as a study runs it:
the imports, then each approach's fit (tuner.packing.resolve_auto_gpu's task, timed by parts).

    python benchmarks/fit_time.py benchmarks/multigpu.yaml model=/tmp/rs
    FIT_NO_CUDNN_SDP=1 python benchmarks/fit_time.py ...     # attention without cuDNN's kernels
"""

from __future__ import annotations

import json
import os
import sys
import time

t0 = time.perf_counter()
import torch  # noqa: E402
import transformers  # noqa: E402,F401
import peft  # noqa: E402,F401

from trainables import footprint  # noqa: E402
from trainables.loop import Trainer  # noqa: E402
from tuner.packing import largest_settings  # noqa: E402
from tuner.study_config import load_study  # noqa: E402

out = {"imports_s": time.perf_counter() - t0}
if os.environ.get("FIT_NO_CUDNN_SDP"):
    torch.backends.cuda.enable_cudnn_sdp(False)
    out["cudnn_sdp"] = False
study, space = load_study(sys.argv[1], sys.argv[2:])
labels = list(study.data.label_names)
fit = Trainer.fit
parts: dict = {}


def timed_fit(self, *a, **k):
    t = time.perf_counter()
    res = fit(self, *a, **k)
    h = res.history[-1]
    parts.update(setup_s=self.setup_seconds, setup_parts=self.setup_parts, fit_s=time.perf_counter() - t,
                 train_s=h["train_seconds"], graphs_s=h.get("graphs_seconds"), graphs=h.get("cuda_graphs"),
                 eval_s=h.get("eval_seconds"),
                 graphs_parts=self.step_graphs.build_parts if self.step_graphs is not None else None)
    return res


Trainer.fit = timed_fit
for approach in space.approaches(study.approach):
    t = time.perf_counter()
    fp = footprint.measure(largest_settings(study, space, approach), labels)
    out[approach] = {"total_s": time.perf_counter() - t, "peak_gib": fp.peak_bytes / 2**30, **parts}
    torch.cuda.empty_cache()
print(json.dumps(out, indent=1))
