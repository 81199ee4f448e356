"""A Llama-architecture model with random weights, as a plain HF folder, with SmolLM2's tokenizer (from
``.devdata/smollm2-tok``): speed and memory do not depend on weight values, and nothing is downloaded.
Built on the GPU where there is one (an 8B model's 16 GB of bf16 weights take seconds there).

    python benchmarks/random_model.py /tmp/smollm2-random          # SmolLM2-135M's own config
    python benchmarks/random_model.py /tmp/llama8b-random 8b       # the Llama-3-8B shape (1b: Llama-3.2-1B)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / ".devdata" / "smollm2-tok"

SHAPES = {  # random-weight Llama shapes (issue 6 item 2, issue 15's 8B-shaped study, multi_adapter.py)
    "135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}


def random_model(dest: Path, shape: str | None = None) -> Path:
    """Write the model to ``dest`` (skipped where a config is already there) and return ``dest``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from trainables.models import save_plain

    dest = Path(dest)
    if (dest / "config.json").exists():
        return dest
    cfg = LlamaConfig.from_pretrained(TOKENIZER)  # SmolLM2's config: its special tokens and RoPE settings
    if shape is not None:
        cfg.update({**SHAPES[shape], "max_position_embeddings": 8192})
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(torch.float32)
    dest.mkdir(parents=True, exist_ok=True)
    save_plain(model, dest)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(dest)
    return dest


if __name__ == "__main__":
    print(random_model(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None))
