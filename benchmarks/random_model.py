"""A SmolLM2-135M-shaped model (its config and tokenizer from ``.devdata/smollm2-tok``, random weights)
as a plain HF folder: speed and memory do not depend on weight values, and nothing is downloaded.

    python benchmarks/random_model.py /tmp/smollm2-random
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def random_smollm2(dest: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from trainables.models import save_plain

    src = ROOT / ".devdata" / "smollm2-tok"
    cfg = LlamaConfig.from_pretrained(src)
    torch.manual_seed(0)
    Path(dest).mkdir(parents=True, exist_ok=True)
    save_plain(LlamaForCausalLM(cfg).to(torch.bfloat16), Path(dest))
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    return Path(dest)


if __name__ == "__main__":
    print(random_smollm2(Path(sys.argv[1])))
