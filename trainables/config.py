"""Typed, validated configuration of one fine-tuning run (YAML + dotted ``--set`` overrides).

Every validation error becomes one line naming the file and the key, e.g.
``demo.yaml: training.learning_rate: Input should be greater than 0``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, model_validator

from trainables.approaches import REGISTRY
from trainables.errors import InputError
from trainables.strict import Strict


class LoraSettings(Strict):
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class TrainingSettings(Strict):
    epochs: int = Field(3, ge=1, le=1000)
    batch_size: int = Field(16, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    max_length: int = Field(128, ge=8, le=32768)
    optimizer: Literal["adamw", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw"
    gradient_checkpointing: bool = False
    epoch_examples: int | None = Field(None, ge=1)
    """At most this many training examples per epoch: each epoch takes the next ones from the training
    set in a shuffled order (a new order at each full pass), so on a large data set an epoch, the unit
    that evaluation, checkpoints and ASHA's rungs count in, stays short. None: every example, every
    epoch."""
    pad_to_multiple_of: int = Field(8, ge=1, le=1024)
    """Batches are padded to their longest sequence rounded up to this: fewer distinct shapes."""
    compile: bool = False
    """``torch.compile`` each decoder layer (one graph serves them all): fewer kernel launches and
    less Python per step, for a compile cost at the start of each run."""
    cuda_graphs: Literal["auto", True, False] = "auto"
    """Replay each training step (forward, backward, clipping, AdamW) from a CUDA graph, one per
    padded batch length (:mod:`trainables.step_graphs`): a small model's step is bound by kernel
    launches, not arithmetic (6-9.5x samples/s for SmolLM2-135M alone on an H200, BENCHMARKS.md). It
    needs one worker, ``grad_accum`` 1, ``optimizer`` adamw, no ``compile`` and no
    ``gradient_checkpointing``; ``auto`` uses it on a CUDA GPU where those hold, and a step that
    cannot be captured trains on eagerly. ``true`` on the CPU runs the same padded steps without
    graphs."""
    dequantize_base: Literal["auto", True, False] = "auto"
    """Dequantize the 4-bit (or 8-bit) base once, before training, into the compute dtype: the very
    weights bitsandbytes dequantizes at every call, without that per-layer work each step (the model
    learns the same thing; 1.3-1.4x samples/s for SmolLM2-135M on an H200). It costs the memory of
    an unquantized base, so ``auto`` does it on a GPU only where that base takes at most 10% of the
    card (a 1B model on an 80 GB card, not an 8B one); never on the CPU."""
    liger_kernel: Literal["auto", True, False] = "auto"
    """Liger Kernel's fused Triton kernels for a Llama base's RMSNorm, SwiGLU and RoPE (``pip install
    'qlora-tune[liger]'``; a CUDA GPU): fewer, larger kernels per layer. On an H200, NF4 + LoRA
    training of the Llama-3-8B shape reached 45% MFU with them, and SmolLM2-135M's graphed steps 1.28x
    the samples/s (BENCHMARKS.md, issue 14). ``auto``: on wherever they can run (a CUDA GPU, a Llama
    base, the package installed, no ``compile``); ``true`` fails where they cannot. Liger patches
    transformers' Llama module too, so Llama models built later in the same process use its layers
    as well."""
    fused_lora: bool = True
    """Compute each LoRA layer over a plain linear base (a dequantized or unquantized base) as one
    autograd function (:mod:`trainables.fused_lora`): the scaled LoRA product is summed inside the
    output's matmul, and likewise in the backward pass, instead of in separate element-wise kernels.
    The same results up to rounding; ``false`` keeps peft's own forward. 4-bit layers always use peft's."""
    seed: int = 42
    bf16: Literal["auto", True, False] = "auto"
    select: Literal["best", "last"] = "best"
    """Which epoch's adapter the output keeps: the best on eval ``metric``, or the last."""
    metric: Literal["f1_macro", "accuracy", "balanced_accuracy", "loss"] = "f1_macro"

    def graph_clashes(self) -> list[str]:
        """The settings that keep training steps out of CUDA graphs (``cuda_graphs``)."""
        return [f for f, bad in (("grad_accum", self.grad_accum > 1), ("optimizer", self.optimizer != "adamw"),
                                 ("compile", self.compile), ("gradient_checkpointing", self.gradient_checkpointing))
                if bad]

    @model_validator(mode="after")
    def _graphable(self):
        if self.liger_kernel is True and self.compile:
            raise ValueError("liger_kernel and compile cannot be combined (torch.compile does not trace Liger's kernels)")
        if self.cuda_graphs is True and self.graph_clashes():
            raise ValueError(f"cuda_graphs: true needs grad_accum 1, optimizer adamw, compile false and "
                             f"gradient_checkpointing false "
                             f"(see {', '.join(self.graph_clashes())})")
        return self


class SplitSettings(Strict):
    eval: float = Field(0.15, ge=0, lt=1)
    test: float = Field(0.15, ge=0, lt=1)
    seed: int = 42

    @model_validator(mode="after")
    def _fits(self):
        if self.eval + self.test >= 0.9:
            raise ValueError("eval + test must leave at least 10% for training")
        return self


class DataSettings(Strict):
    train: str
    eval: str | None = None
    test: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    label_names: list[str] | None = None
    """Names for integer labels 0..n-1 (also the label text the generation approach writes)."""
    split: SplitSettings = SplitSettings()
    max_text_chars: int = Field(100_000, ge=1)


class _RunSettings(Strict):
    """One fine-tuning run: what ``qlora-tune train`` takes and what a trial runs. :data:`RunConfig`
    adds ``approach`` and one settings block per approach (``head:``, ``generation:``, ...)."""

    model: str = "smollm2-135m"
    quantization: Literal["nf4", "int8", "none"] = "nf4"
    compute_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """4-bit compute dtype; ``auto`` is bfloat16 on CUDA and float32 on the CPU (bitsandbytes'
    bfloat16 path is much slower there; BENCHMARKS.md)."""
    trust_remote_code: bool = False
    lora: LoraSettings = LoraSettings()
    training: TrainingSettings = TrainingSettings()
    data: DataSettings

    def dump(self) -> dict[str, Any]:
        d = self.model_dump(mode="json")
        return {"model": d.pop("model"), "approach": d.pop("approach"), **d}


RunConfig = create_model(
    "RunConfig", __base__=_RunSettings, __module__=__name__,
    approach=(Literal[tuple(REGISTRY)], next(iter(REGISTRY))),
    **{name: (cls.Settings, cls.Settings()) for name, cls in REGISTRY.items()},
)
RunConfig.__doc__ = _RunSettings.__doc__


# ---------------------------------------------------------------- loading and overrides


def _suggest(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def format_validation_error(err: ValidationError, model_cls: type[BaseModel], source: str) -> str:
    """First error of ``err`` as one line: ``source: dotted.key: message``."""
    e = err.errors()[0]
    loc = [str(p) for p in e["loc"]]
    key = ".".join(loc) or "(top level)"
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        fields = _fields_at(model_cls, loc[:-1])
        msg = f"unknown key{_suggest(loc[-1], fields)}"
    elif e["type"] == "missing":
        msg = "required key is missing"
    elif e["type"] == "value_error":  # a validator's own message, without pydantic's "Value error, "
        msg = str(e.get("ctx", {}).get("error", msg))
    more = len(err.errors()) - 1
    tail = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {key}: {msg}{tail}"


def _fields_at(model_cls: type[BaseModel], path: list[str]) -> list[str]:
    cls = model_cls
    for p in path:
        f = cls.model_fields.get(p)
        ann = getattr(f, "annotation", None) if f else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        cls = ann
    return list(cls.model_fields)


def get_dotted(tree: dict, dotted: str) -> Any:
    """The value at ``dotted`` in ``tree``, or None where the path does not exist."""
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def parse_set(items: list[str] | None) -> list[tuple[str, Any]]:
    """``key.path=value`` strings into pairs; values are parsed as YAML scalars/lists."""
    out = []
    for item in items or []:
        if "=" not in item:
            raise InputError(f"--set {item!r}: expected KEY=VALUE, e.g. training.epochs=2")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise InputError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise InputError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InputError(f"{path}: top level must be a mapping of keys, got {type(raw).__name__}")
    return raw


DATA_PATH_KEYS = ("train", "eval", "test")


def _anchor_paths(tree: dict, base: Path) -> None:
    """Make relative data paths in a config file relative to that file's folder."""
    data = tree.get("data")
    if not isinstance(data, dict):
        return
    for k in DATA_PATH_KEYS:
        v = data.get(k)
        if isinstance(v, str) and not v.startswith("builtin:") and not Path(v).is_absolute():
            data[k] = str((base / v).resolve())
    model = tree.get("model")
    if isinstance(model, str) and (model.startswith("./") or model.startswith("../")):
        tree["model"] = str((base / model).resolve())


def build_config(model_cls, tree: dict, overrides: list[tuple[str, Any]], source: str):
    """Validate ``tree`` with ``overrides`` applied into an instance of ``model_cls``."""
    tree = dict(tree)
    for key, value in overrides:
        if key.startswith("data.") and key.split(".")[1] in DATA_PATH_KEYS and isinstance(value, str):
            if not value.startswith("builtin:"):
                value = str(Path(value).resolve())
        set_dotted(tree, key, value)
    try:
        return model_cls.model_validate(tree)
    except ValidationError as e:
        raise InputError(format_validation_error(e, model_cls, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None, model_cls=RunConfig):
    tree = read_yaml(path)
    _anchor_paths(tree, Path(path).resolve().parent)
    return build_config(model_cls, tree, parse_set(overrides), str(path))
