"""Seconds a fresh Python process takes to import what a classifier needs (issue 13: most of a Ray Data
actor's start). Each line is a new process; the last part lists the slowest modules (``-X importtime``).

    bash benchmarks/gpu_run.sh import_times.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

SETS = {
    "torch": "import torch",
    "torch+cuda": "import torch; torch.zeros(1, device='cuda')",
    "torch+transformers.llama": "import torch, transformers.models.llama.modeling_llama",
    "torch+bitsandbytes": "import torch, bitsandbytes",
    "torch+peft": "import torch, peft",
    "all": "import torch, transformers.models.llama.modeling_llama, bitsandbytes, peft",
    "trainables.predict+all": "import trainables.predict, transformers.models.llama.modeling_llama, bitsandbytes, peft",
}


def timed(code: str, env: dict) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    return round(time.perf_counter() - t, 2)


def main() -> None:
    base = dict(os.environ)
    offline = {**base, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for name, code in SETS.items():
        print(f"{name:28s} {timed(code, base):6.2f} s", flush=True)
    print(f"{'all, HF_HUB_OFFLINE=1':28s} {timed(SETS['all'], offline):6.2f} s", flush=True)
    p = subprocess.run([sys.executable, "-X", "importtime", "-c", SETS["all"]], env=base, capture_output=True, text=True)
    rows = [line.split("|") for line in p.stderr.splitlines() if line.startswith("import time:") and "|" in line]
    rows = [(int(r[1]), int(r[0].split(":")[1]), r[2].rstrip()) for r in rows[1:] if r[1].strip().isdigit()]
    print("slowest by self time (us):")
    for cum, own, mod in sorted(rows, key=lambda r: -r[1])[:25]:
        print(f"  self {own:>9}  cumulative {cum:>9}  {mod}")


if __name__ == "__main__":
    main()
